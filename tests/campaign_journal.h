// The fault campaign's journal: the digest of every state each launch of each rank snapshotted,
// and, per rank, the history the job resumed: which launch's snapshots hold which steps.
//
// A launch that restored step s from launch P continues P's history from s: P's snapshots after
// s are abandoned, and so are those of every launch P had abandoned. A restored state passes only
// if its digest is the one the history snapshotted at that step. Transport-free; not thread-safe.
#ifndef TESSERA_TESTS_CAMPAIGN_JOURNAL_H_
#define TESSERA_TESTS_CAMPAIGN_JOURNAL_H_

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace tessera::testing {

class Journal {
 public:
  // Launch `launch` of `rank` snapshotted (or was about to snapshot) `step` with `digest`.
  void Snapshotted(int rank, uint64_t launch, int64_t step, uint64_t digest);

  // "" when (step, digest) is what the history `rank` resumes (its newest launch's) snapshotted at
  // `step`; otherwise what is wrong, naming the launch that did snapshot these bytes, if any.
  std::string CheckRestored(int rank, int64_t step, uint64_t digest) const;

  // Launch `launch` of `rank` started from the restored (step, digest): it continues the history
  // of the launch that snapshotted those bytes (the newest launch's if none did).
  void Resumed(int rank, uint64_t launch, int64_t step, uint64_t digest);
  // Launch `launch` of `rank` started fresh: every earlier snapshot is abandoned.
  void Fresh(int rank, uint64_t launch);

  // "L3(0..12] L7(12..)" for the history `rank` resumes.
  std::string Describe(int rank) const;
  // Snapshots journaled for `rank`, all launches together.
  size_t SnapshotCount(int rank) const;

 private:
  // Launch `launch`'s snapshots of steps in (after, through] belong to the history.
  struct Segment {
    uint64_t launch;
    int64_t after;
    int64_t through;
  };
  using History = std::vector<Segment>;
  static std::string Describe(const History& history);
  // The launch of `rank` that snapshotted (step, digest), 0 when none did.
  uint64_t Owner(int rank, int64_t step, uint64_t digest) const;

  std::map<int, std::map<uint64_t, std::map<int64_t, uint64_t>>> digests_;  // rank, launch, step
  std::map<int, History> current_;                                          // per rank
  std::map<std::pair<int, uint64_t>, History> of_launch_;
};

}  // namespace tessera::testing

#endif  // TESSERA_TESTS_CAMPAIGN_JOURNAL_H_
