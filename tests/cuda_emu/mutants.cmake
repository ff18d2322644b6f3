# Mutants: copies of csrc with one known defect put back, each built as its own emulation library
# (only the translation unit it touches is recompiled). ctest runs a few emulation tests against
# each and passes when the emulator reports the defect as it should: a mutant the tests do not
# catch fails the build's tests.
#
# udat_emu_mutant(<name> <file under csrc> <text> <replacement> <translation unit>
#                 <pytest -k selection> <what the report must match>)
function(udat_emu_mutant name file from to tu select expect)
  set(root ${CMAKE_BINARY_DIR}/mutants/${name})
  file(GLOB_RECURSE sources RELATIVE ${CMAKE_SOURCE_DIR}/csrc
       ${CMAKE_SOURCE_DIR}/csrc/*.h ${CMAKE_SOURCE_DIR}/csrc/cuda/*)
  foreach(f IN LISTS sources)
    if(NOT f STREQUAL file)
      configure_file(${CMAKE_SOURCE_DIR}/csrc/${f} ${root}/${f} COPYONLY)
    endif()
  endforeach()
  file(READ ${CMAKE_SOURCE_DIR}/csrc/${file} text)
  string(FIND "${text}" "${from}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "mutant ${name}: csrc/${file} no longer holds the text it changes:\n${from}")
  endif()
  string(REPLACE "${from}" "${to}" text "${text}")
  file(WRITE ${root}.tmp "${text}")
  configure_file(${root}.tmp ${root}/${file} COPYONLY)  # rewritten only when it changes
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/csrc/${file})

  udat_emu_tu(${tu} _mutant_${name} ${root} ${EMU_CHECK_FLAGS})
  set(objs udat_emu_${tu}_mutant_${name})
  foreach(other IN LISTS EMU_TUS)
    if(NOT other STREQUAL tu)
      list(APPEND objs udat_emu_${other})
    endif()
  endforeach()
  udat_emu_library(udat_cuda_emu_mutant_${name} udat_emu_core udat_emu_selftest ${objs})
  add_test(NAME cuda_emu_mutant_${name} COMMAND ${EMU_PYTEST} -x -k "${select}")
  set_tests_properties(cuda_emu_mutant_${name} PROPERTIES LABELS "emu;mutant"
    PASS_REGULAR_EXPRESSION "${expect}"
    ENVIRONMENT "UDAT_CUDA_EMU_LIB=$<TARGET_FILE:udat_cuda_emu_mutant_${name}>;PYTHONPATH=${CMAKE_SOURCE_DIR}")
endfunction()

# The epilogue race fixed earlier: the in-place logit gradient overwrites the target column while
# other threads of the row still read it.
udat_emu_mutant(epilogue_race cuda/large_c_kernels.cuh
  "  __syncthreads();  // every read of the target column comes before the in-place writes\n"
  ""
  large_c "test_classes and gemm" "CUDA emulator: data race")

# A missing __syncthreads: phase 2 of the small-C kernel reads the logit gradients other warps
# are still writing.
udat_emu_mutant(missing_sync cuda/small_c_kernels.cuh
  "    if (!a.want_grad) continue;\n    __syncthreads();\n"
  "    if (!a.want_grad) continue;\n"
  small_c "test_classes and fused" "CUDA emulator: (data race|read of shared memory never written)")

# A misaligned vector load: 16-byte loads of x chosen without checking x's address.
udat_emu_mutant(misaligned_load cuda/small_c.cu
  "D % (16 / int64_t(sizeof(S))) == 0 && aligned(a.x, 16)"
  "D % (16 / int64_t(sizeof(S))) == 0"
  small_c "test_unaligned_storage and fused" "CUDA emulator: misaligned 16-byte vector access of 'x'")

# A missing fence before the last-block-done counter: the block that adds the partials reads
# other blocks' partials that nothing orders before its reads.
udat_emu_mutant(missing_fence cuda/small_c_kernels.cuh
  "      __threadfence();  // ... and visible before the count says so\n"
  ""
  small_c "test_classes and fused" "CUDA emulator: data race: .*__threadfence \\+ atomic")
