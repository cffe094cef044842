// CapacityBudget: the daemon's one count of shared-memory bytes (`memory.capacity`), shared by
// every store that creates segments: SnapshotStore (two slots per rank) and FragmentStore (the
// fragments held for other nodes). A store reserves the bytes of a segment before creating it and
// releases them after deleting it, so a node that is full refuses with the numbers instead of
// dying of SIGBUS.
//
// Sharing with SnapshotStore: SnapshotStore still keeps its own count against
// SnapshotStore::Options::capacity_bytes. Until it takes a CapacityBudget*, give each store its
// own share (for example FragmentStore::Options::budget = a CapacityBudget of
// memory.capacity - store.capacity_bytes). To share one budget, replace SnapshotStore's
// used_bytes_ arithmetic with Reserve (Register), Release (DeleteSegment) and Charge
// (AdoptExisting) on the same object.
//
// Reclaimers: a store that keeps spare memory (FragmentStore's pool of recycled segments) adds a
// reclaimer. When a Reserve does not fit, the budget calls the reclaimers (without holding its
// lock) to give memory back, then tries once more.
//
// Thread-safety: all methods may be called concurrently. Reserve must not be called while
// holding a lock that a reclaimer takes.
#ifndef TESSERA_DAEMON_STORE_CAPACITY_BUDGET_H_
#define TESSERA_DAEMON_STORE_CAPACITY_BUDGET_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"

namespace tessera {

class CapacityBudget {
 public:
  // Called with the bytes still missing; frees what it can (by calling Release) and returns
  // the bytes it released.
  using Reclaimer = std::function<uint64_t(uint64_t bytes_wanted)>;

  explicit CapacityBudget(uint64_t capacity_bytes) : capacity_bytes_(capacity_bytes) {}
  CapacityBudget(const CapacityBudget&) = delete;
  CapacityBudget& operator=(const CapacityBudget&) = delete;

  // Takes `bytes` from the budget. kResourceExhausted, changing nothing, when they do not fit
  // even after the reclaimers ran: "<what> needs N bytes but only F of C bytes are free".
  absl::Status Reserve(uint64_t bytes, const std::string& what);

  // Takes `bytes` only if they are free now: never runs a reclaimer (for speculative
  // allocations that must not evict anything). kResourceExhausted as Reserve otherwise.
  absl::Status ReserveIfFree(uint64_t bytes, const std::string& what);

  // Gives back bytes taken by Reserve or Charge. REQUIRES: bytes <= used_bytes().
  void Release(uint64_t bytes);

  // Takes `bytes` even past the capacity (re-adopting segments that exist already at start).
  // Returns false when the budget is now over capacity.
  bool Charge(uint64_t bytes);

  // Returns an id for RemoveReclaimer. The reclaimer must stay callable until removed.
  int AddReclaimer(Reclaimer reclaimer);
  void RemoveReclaimer(int id);

  uint64_t capacity_bytes() const { return capacity_bytes_; }
  uint64_t used_bytes() const;
  uint64_t free_bytes() const;

 private:
  const uint64_t capacity_bytes_;
  mutable absl::Mutex mu_;
  uint64_t used_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int next_reclaimer_id_ ABSL_GUARDED_BY(mu_) = 1;
  std::map<int, Reclaimer> reclaimers_ ABSL_GUARDED_BY(mu_);
  // Serialises reclaimer runs, so RemoveReclaimer can wait until none is running.
  absl::Mutex reclaim_mu_ ABSL_ACQUIRED_BEFORE(mu_);
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_STORE_CAPACITY_BUDGET_H_
