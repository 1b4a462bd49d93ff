# diffcam._cuda: the batched CUDA kernels (csrc/cuda), included by the top-level CMakeLists.txt
# when a CUDA compiler is found and DIFFCAM_CUDA is not "off".
#
# * Architectures: CMAKE_CUDA_ARCHITECTURES (or the CUDAARCHS environment variable) when the
#   user sets it, else "80;90" (SASS for sm_80 and sm_90 plus PTX).
# * The kernels are compiled into a static library by nvcc (C++17, -O3, no fast math: the
#   float64 statistics and exponentials must match the reference); the pybind11 module itself
#   is plain C++ and links the CUDA runtime statically, so no libcudart is needed at run time
#   (only the driver) and the module imports on machines without a GPU.
# * The module does not link against PyTorch.

if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
  set(CMAKE_CUDA_ARCHITECTURES "80;90")
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

get_filename_component(_dc_root "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)

set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)

add_library(diffcam_cuda_kernels STATIC
  ${_dc_root}/csrc/cuda/rank_filter.cu
  ${_dc_root}/csrc/cuda/refine.cu
  ${_dc_root}/csrc/cuda/metrics.cu)
set_target_properties(diffcam_cuda_kernels PROPERTIES
  POSITION_INDEPENDENT_CODE ON
  CUDA_SEPARABLE_COMPILATION OFF
  CUDA_RUNTIME_LIBRARY Static
  CUDA_VISIBILITY_PRESET hidden
  CXX_VISIBILITY_PRESET hidden)
target_compile_options(diffcam_cuda_kernels PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:-O3 -lineinfo>)
target_include_directories(diffcam_cuda_kernels PUBLIC ${_dc_root}/csrc/cuda)
target_link_libraries(diffcam_cuda_kernels PUBLIC CUDA::cudart_static)

pybind11_add_module(_cuda MODULE ${_dc_root}/csrc/cuda/bindings_cuda.cpp)
target_link_libraries(_cuda PRIVATE diffcam_cuda_kernels CUDA::cudart_static)
install(TARGETS _cuda DESTINATION diffcam)

message(STATUS "diffcam: building diffcam._cuda for CUDA architectures ${CMAKE_CUDA_ARCHITECTURES}")
