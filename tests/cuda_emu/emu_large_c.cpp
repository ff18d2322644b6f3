// The host C++ build of csrc/cuda/large_c.cu under the emulator (emulator.h).
#include "cuda/large_c.cu"
