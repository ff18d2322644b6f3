// The host C++ build of csrc/cuda/margin_ce_cuda.cu under the emulator (emulator.h).
#include "cuda/margin_ce_cuda.cu"
