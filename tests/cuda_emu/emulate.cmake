# MARKOVKIT_CUDA=EMULATE: every csrc/**/*.cu, rewritten by rewrite.py, compiled as host C++ against cuda_emu.h,
# with stand-ins for the c10/cuda headers; the glue's CUDA paths are compiled in and run these host kernels when
# markovkit.cuda_emulation() is on. The csrc/**/*.cuh headers (launches among them) are rewritten too and found
# before csrc's. Needs the CUDA toolkit's headers (cuda_fp16.h, cuda_runtime_api.h), not nvcc.
find_path(MARKOVKIT_CUDA_INCLUDE cuda_fp16.h
  HINTS ENV CUDA_HOME ENV CUDA_PATH /usr/local/cuda
  PATH_SUFFIXES include
  REQUIRED)
set(emu_dir ${CMAKE_CURRENT_LIST_DIR})
set(emu_out ${CMAKE_CURRENT_BINARY_DIR}/cuda_emu)
file(GLOB_RECURSE emu_cu_sources CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/csrc/*.cu ${PROJECT_SOURCE_DIR}/csrc/*.cuh)
foreach(cu ${emu_cu_sources})
  file(RELATIVE_PATH rel ${PROJECT_SOURCE_DIR}/csrc ${cu})
  # a source becomes FILE.cu.cpp, a header keeps its name (the sources include it as csrc does)
  set(out ${emu_out}/${rel})
  if(cu MATCHES "\\.cu$")
    set(out ${out}.cpp)
  endif()
  add_custom_command(
    OUTPUT ${out}
    COMMAND ${Python_EXECUTABLE} ${emu_dir}/rewrite.py ${cu} ${out}
    DEPENDS ${cu} ${emu_dir}/rewrite.py
    COMMENT "cuda_emu: ${rel}")
  target_sources(_C PRIVATE ${out})
endforeach()
target_sources(_C PRIVATE ${emu_dir}/cuda_emu.cpp)
# before csrc and torch: the stand-ins of include/ replace their namesakes (c10/cuda/*.h, attention/swa_mma.cuh and
# swa_wgmma.cuh, common/cp_async.cuh and device_check.cuh);
# then the rewritten headers
target_include_directories(_C BEFORE PRIVATE ${emu_dir}/include ${emu_dir} ${emu_out})
target_include_directories(_C PRIVATE ${MARKOVKIT_CUDA_INCLUDE})
target_compile_definitions(_C PRIVATE
  MARKOVKIT_WITH_CUDA
  MARKOVKIT_CUDA_EMULATION
  MARKOVKIT_SM90A)
