// What a daemon has learned of each job's state (its epoch, newest commit record and drop),
// kept in one small file per job next to its slots, so that a daemon that restarts still knows
// them (docs/PROTOCOL.md, "The epoch and the commit are durable"): a drop taken by every member
// that then restarted is not undone by a member that missed it and comes back with the dropped
// run's copies.
//
// A file is "<directory>/<job>.jobstate": a header (magic, format, body length, CRC32C of the
// body) and the body, a serialized coordination.JobState. It is written to a temporary name,
// synced and renamed, so that a crash leaves the old file or the new one. Read back at start,
// every file is checked like any input (the directory is the daemon's, but its bytes are memory
// that could be damaged): its size bounded, its CRC32C, its job id against its name, and the
// state through the same validation as a peer's message; a file that fails is refused, named
// and left alone.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "daemon/coordination/job_coordinator.h"

namespace tessera {

class JobStateJournal {
 public:
  static constexpr char kSuffix[] = ".jobstate";
  // Bounds on what a start reads back: files, and bytes per file (a commit record of the largest
  // world a registration accepts fits with room to spare).
  static constexpr size_t kMaxFiles = 65536;
  static constexpr size_t kMaxFileBytes = size_t{64} << 20;

  // An empty directory keeps nothing (Save and Remove do nothing, Load finds nothing).
  explicit JobStateJournal(std::string directory) : directory_(std::move(directory)) {}

  // Replaces the job's file with `state`'s epoch, commit record and drop (dead steps are not
  // kept: they are re-learned with the next state).
  absl::Status Save(const JobState& state) const;
  // Deletes the job's file (the daemon no longer keeps the job's state).
  void Remove(const std::string& job_id) const;
  // Deletes every job's file and any half-written replacement (the machine lost its memory);
  // other files in the directory stay. Returns how many it deleted.
  int RemoveAll() const;

  struct Loaded {
    std::vector<JobState> states;
    // One line per file refused: its name and why.
    std::vector<std::string> refused;
  };
  Loaded Load() const;

  // The file's bytes for `state`, and the state from a file's bytes (exposed for tests).
  static std::string Encode(const JobState& state);
  static absl::Status Decode(const std::string& job_id, const std::string& bytes, JobState* out);

 private:
  std::string PathOf(const std::string& job_id) const;

  const std::string directory_;
};

}  // namespace tessera
