// The host C++ build of csrc/cuda/small_c.cu under the emulator (emulator.h).
#include "cuda/small_c.cu"
