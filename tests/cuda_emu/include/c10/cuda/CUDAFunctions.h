#pragma once
#include "c10/cuda/emulation.h"
