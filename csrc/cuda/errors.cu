// The runtime-level calls of the C API: error text, device count (the probe of a usable driver), current device.
#include "common.cuh"

extern "C" const char* dlm_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

extern "C" int dlm_device_count(void) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  return err == cudaSuccess ? count : -static_cast<int>(err);
}

extern "C" int dlm_set_device(int device) { return static_cast<int>(cudaSetDevice(device)); }
