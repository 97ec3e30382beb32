# Locate the installed torch from the Python interpreter that runs the build (no find_package(Torch):
# its config insists on nvrtc/cuBLAS, which a compile-only CUDA toolkit lacks).
# Sets TORCH_VERSION, TORCH_CUDA_VERSION, TORCH_CXX11_ABI, TORCH_INCLUDE_DIRS, TORCH_LIBRARY_DIR,
# TORCH_LIBRARIES and TORCH_CUDA_LIBRARIES.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import os, torch; from torch.utils import cpp_extension as c; print(torch.__version__); print(torch.version.cuda or ''); print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(','.join(c.include_paths())); print(os.path.join(os.path.dirname(torch.__file__), 'lib'))"
  OUTPUT_VARIABLE _torch_facts
  RESULT_VARIABLE _torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR "markovkit needs torch installed in the build's Python (${Python_EXECUTABLE}); "
                      "build with: pip install --no-build-isolation .")
endif()
string(REPLACE "\n" ";" _torch_facts "${_torch_facts}")
list(GET _torch_facts 0 TORCH_VERSION)
list(GET _torch_facts 1 TORCH_CUDA_VERSION)
list(GET _torch_facts 2 TORCH_CXX11_ABI)
list(GET _torch_facts 3 TORCH_INCLUDE_DIRS)
list(GET _torch_facts 4 TORCH_LIBRARY_DIR)
string(REPLACE "," ";" TORCH_INCLUDE_DIRS "${TORCH_INCLUDE_DIRS}")

foreach(_lib c10 torch_cpu torch)
  find_library(TORCH_${_lib}_LIBRARY ${_lib} PATHS "${TORCH_LIBRARY_DIR}" NO_DEFAULT_PATH REQUIRED)
  list(APPEND TORCH_LIBRARIES ${TORCH_${_lib}_LIBRARY})
endforeach()
if(TORCH_CUDA_VERSION)
  foreach(_lib c10_cuda torch_cuda)
    find_library(TORCH_${_lib}_LIBRARY ${_lib} PATHS "${TORCH_LIBRARY_DIR}" NO_DEFAULT_PATH)
    list(APPEND TORCH_CUDA_LIBRARIES ${TORCH_${_lib}_LIBRARY})
  endforeach()
endif()
