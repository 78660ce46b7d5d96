// dlm_error_string: the text of a code returned by the launchers (a cudaError_t).
#include "common.cuh"

extern "C" const char* dlm_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }
