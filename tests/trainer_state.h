// Deterministic training state for multi-process tests whose bytes depend on the state's HISTORY,
// not only on its step. Each step moves the state on from the previous one, and each launch of a
// trainer folds into it an identifier chosen by the test driver and the step it started from
// (0 when fresh, the restored step otherwise). So two launches that started from the same step
// never produce the same bytes again: a driver that journals the digest of every snapshot, per
// launch, can tell the bytes of an abandoned launch from those of the history the job resumed.
//
// The state carries its own history in its blob ("user_state"): the step, the chain value that
// folds every step and launch in, and the launches themselves. A process that restores a state
// replays that history and checks every byte, so bytes torn between two snapshots, a shard of
// another rank or step, or a blob that does not belong with the tensors are caught by the trainer
// itself; which history is the right one is the driver's to say.
//
// Tensor bytes at step s are base XOR mask, where base depends on the layout seed only and the
// mask (one 64-bit word per entry, repeated) on the chain value at s: every byte changes from one
// step to the next with probability 255/256, and replaying a history of s steps costs s hashes.
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
// one blob "user_state" of 4096 bytes' capacity holding seeded bytes. Tensors hold the contents of
// step 0.
std::vector<StateEntry> MakeState(uint64_t seed, int tensors, uint64_t min_bytes,
                                  uint64_t max_bytes, uint64_t total_bytes);

// Fills every byte with noise that no history produces (so a restore that writes nothing is
// caught); blobs get length 0.
void Scramble(std::vector<StateEntry>* state, uint64_t salt);

std::vector<Client::Entry> ClientEntries(std::vector<StateEntry>* state);

// A 64-bit digest of the valid bytes of `state` (lengths and entry boundaries included), chained
// from `digest` so that several states can be digested as one.
uint64_t DigestState(const std::vector<StateEntry>& state, uint64_t digest = 0);

// One launch of a trainer: its identifier and the step it started from.
struct Launch {
  uint64_t id = 0;
  int64_t step = 0;
};

// A state with its history. Not thread-safe.
class HistoryState {
 public:
  // The layout and base bytes come from `layout_seed` (MakeState); the history starts from
  // `chain_seed` (a rank's own state: seed and rank; a replicated state: the same on every
  // replica). The state is at step 0 with no launch yet.
  HistoryState(uint64_t layout_seed, uint64_t chain_seed, int tensors, uint64_t min_bytes,
               uint64_t max_bytes, uint64_t total_bytes);

  std::vector<StateEntry>& entries() { return entries_; }
  const std::vector<StateEntry>& entries() const { return entries_; }
  int64_t step() const { return history_.step; }
  // The launches of this history that the retained blob still names, oldest first.
  const std::vector<Launch>& launches() const { return history_.launches; }

  // Back to step 0 with no launch (a fresh start after a scramble).
  void Reset();

  // A launch starts from the current step: folded into the chain when the state next advances.
  void StartLaunch(uint64_t launch_id);

  // Moves to step() + 1: every tensor is re-masked and the blob rewritten.
  void Advance();

  // After a restore of `step` into entries() (lengths included): reads the history from the
  // blob, replays it and checks every byte. Returns "" and takes the history over when
  // consistent; otherwise describes the first difference and leaves the history as it was.
  std::string AdoptRestored(int64_t step);

  // "id@step,id@step,..." of launches().
  std::string DescribeLaunches() const;

 private:
  // What the blob records: the step, its chain value, and the retained history (the chain value
  // at base_step and the launches since).
  struct History {
    int64_t step = 0;
    uint64_t chain = 0;
    int64_t base_step = 0;
    uint64_t base_chain = 0;
    std::vector<Launch> launches;
  };
  // The chain value at `step` of `history` (launches that start at `step` not folded in yet).
  static uint64_t ChainAt(const History& history, int64_t step);
  static std::string Describe(const std::vector<Launch>& launches);
  void WriteBlob();

  uint64_t layout_seed_, chain_seed_;
  std::vector<StateEntry> entries_;
  History history_;  // of the bytes in entries_, plus a launch started since
};

}  // namespace tessera::testing

#endif  // TESSERA_TESTS_TRAINER_STATE_H_
