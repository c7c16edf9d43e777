
# Consider dependencies only in project.
set(CMAKE_DEPENDS_IN_PROJECT_ONLY OFF)

# The set of languages for which implicit dependencies are needed:
set(CMAKE_DEPENDS_LANGUAGES
  )

# The set of dependency files which are needed:
set(CMAKE_DEPENDS_DEPENDENCY_FILES
  "/work/main/native/pme_callback.c" "CMakeFiles/pme.dir/native/pme_callback.c.o" "gcc" "CMakeFiles/pme.dir/native/pme_callback.c.o.d"
  "/work/main/native/pme_compact.c" "CMakeFiles/pme.dir/native/pme_compact.c.o" "gcc" "CMakeFiles/pme.dir/native/pme_compact.c.o.d"
  "/work/main/native/pme_evict.c" "CMakeFiles/pme.dir/native/pme_evict.c.o" "gcc" "CMakeFiles/pme.dir/native/pme_evict.c.o.d"
  "/work/main/native/pme_fattn.c" "CMakeFiles/pme.dir/native/pme_fattn.c.o" "gcc" "CMakeFiles/pme.dir/native/pme_fattn.c.o.d"
  "/work/main/native/pme_head_weights.c" "CMakeFiles/pme.dir/native/pme_head_weights.c.o" "gcc" "CMakeFiles/pme.dir/native/pme_head_weights.c.o.d"
  "/work/main/native/pme_kdot.c" "CMakeFiles/pme.dir/native/pme_kdot.c.o" "gcc" "CMakeFiles/pme.dir/native/pme_kdot.c.o.d"
  "/work/main/native/pme_pins.c" "CMakeFiles/pme.dir/native/pme_pins.c.o" "gcc" "CMakeFiles/pme.dir/native/pme_pins.c.o.d"
  "/work/main/native/pme_policy.c" "CMakeFiles/pme.dir/native/pme_policy.c.o" "gcc" "CMakeFiles/pme.dir/native/pme_policy.c.o.d"
  "/work/main/native/pme_policy_h2o.c" "CMakeFiles/pme.dir/native/pme_policy_h2o.c.o" "gcc" "CMakeFiles/pme.dir/native/pme_policy_h2o.c.o.d"
  "/work/main/native/pme_policy_morphkv.c" "CMakeFiles/pme.dir/native/pme_policy_morphkv.c.o" "gcc" "CMakeFiles/pme.dir/native/pme_policy_morphkv.c.o.d"
  "/work/main/native/pme_policy_snapkv.c" "CMakeFiles/pme.dir/native/pme_policy_snapkv.c.o" "gcc" "CMakeFiles/pme.dir/native/pme_policy_snapkv.c.o.d"
  "/work/main/native/pme_policy_streaming.c" "CMakeFiles/pme.dir/native/pme_policy_streaming.c.o" "gcc" "CMakeFiles/pme.dir/native/pme_policy_streaming.c.o.d"
  "/work/main/native/pme_policy_tova.c" "CMakeFiles/pme.dir/native/pme_policy_tova.c.o" "gcc" "CMakeFiles/pme.dir/native/pme_policy_tova.c.o.d"
  "/work/main/native/pme_scores.c" "CMakeFiles/pme.dir/native/pme_scores.c.o" "gcc" "CMakeFiles/pme.dir/native/pme_scores.c.o.d"
  "/work/main/native/pme_selfcheck.c" "CMakeFiles/pme.dir/native/pme_selfcheck.c.o" "gcc" "CMakeFiles/pme.dir/native/pme_selfcheck.c.o.d"
  "/work/main/native/pme_session.c" "CMakeFiles/pme.dir/native/pme_session.c.o" "gcc" "CMakeFiles/pme.dir/native/pme_session.c.o.d"
  "/work/main/native/pme_state.c" "CMakeFiles/pme.dir/native/pme_state.c.o" "gcc" "CMakeFiles/pme.dir/native/pme_state.c.o.d"
  "/work/main/native/pme_test_hooks.c" "CMakeFiles/pme.dir/native/pme_test_hooks.c.o" "gcc" "CMakeFiles/pme.dir/native/pme_test_hooks.c.o.d"
  )

# Targets to which this target links which contain Fortran sources.
set(CMAKE_Fortran_TARGET_LINKED_INFO_FILES
  )

# Targets to which this target links which contain Fortran sources.
set(CMAKE_Fortran_TARGET_FORWARD_LINKED_INFO_FILES
  )

# Fortran module output directory.
set(CMAKE_Fortran_TARGET_MODULE_DIR "")
