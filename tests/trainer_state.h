// Deterministic, seeded training state for multi-process tests: the bytes of every entry at every
// step are a pure function of (seed, step), so a process that restores step s can check every
// byte, and a stale byte from another step is caught. Every byte changes from one step to the next
// (with probability 255/256 per byte).
#ifndef TESSERA_TESTS_TRAINER_STATE_H_
#define TESSERA_TESTS_TRAINER_STATE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "agent/client.h"

namespace tessera::testing {

struct StateEntry {
  EntrySpec spec;
  std::vector<uint8_t> bytes;  // capacity for a blob
  uint64_t length = 0;         // valid bytes
};

// Builds the registered layout for `seed`: `tensors` tensors whose sizes are spread log-uniformly
// over [min_bytes, max_bytes] (capped so they sum to at most total_bytes) with mixed dtypes, plus
// one blob "user_state" of up to 4096 bytes. The contents are those of step 0.
std::vector<StateEntry> MakeState(uint64_t seed, int tensors, uint64_t min_bytes,
                                  uint64_t max_bytes, uint64_t total_bytes);

// Moves the contents from step `from` to step `to` in place.
void AdvanceState(uint64_t seed, std::vector<StateEntry>* state, int64_t from, int64_t to);

// Compares `state` with the expected contents at `step`. Returns "" when bit-exact, otherwise a
// description of the first difference.
std::string CheckState(uint64_t seed, const std::vector<StateEntry>& state, int64_t step);

// Fills every byte with noise that no step produces (so a restore that writes nothing is caught).
void Scramble(std::vector<StateEntry>* state, uint64_t salt);

std::vector<Client::Entry> ClientEntries(std::vector<StateEntry>* state);

}  // namespace tessera::testing

#endif  // TESSERA_TESTS_TRAINER_STATE_H_
