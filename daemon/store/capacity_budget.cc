#include "daemon/store/capacity_budget.h"

#include <vector>

#include "absl/strings/str_cat.h"

namespace tessera {
namespace {

absl::Status NotFree(const std::string& what, uint64_t bytes, uint64_t free_bytes,
                     uint64_t capacity_bytes) {
  return absl::ResourceExhaustedError(absl::StrCat(
      what, " needs ", bytes, " bytes but only ", free_bytes, " of ", capacity_bytes,
      " bytes of shared-memory capacity are free (raise memory.capacity, or free older "
      "steps or other jobs)"));
}

}  // namespace

absl::Status CapacityBudget::Reserve(uint64_t bytes, const std::string& what) {
  for (int attempt = 0;; ++attempt) {
    uint64_t missing;
    {
      absl::MutexLock lock(&mu_);
      const uint64_t free_bytes = capacity_bytes_ > used_bytes_ ? capacity_bytes_ - used_bytes_ : 0;
      if (bytes <= free_bytes) {
        used_bytes_ += bytes;
        return absl::OkStatus();
      }
      if (attempt > 0 || reclaimers_.empty()) {
        return NotFree(what, bytes, free_bytes, capacity_bytes_);
      }
      missing = bytes - free_bytes;
    }
    // Reclaimers call Release, which takes mu_: run them without it.
    absl::MutexLock reclaim_lock(&reclaim_mu_);
    std::vector<Reclaimer> reclaimers;
    {
      absl::MutexLock lock(&mu_);
      for (const auto& [id, r] : reclaimers_) reclaimers.push_back(r);
    }
    for (const Reclaimer& r : reclaimers) {
      const uint64_t freed = r(missing);
      missing = freed >= missing ? 0 : missing - freed;
      if (missing == 0) break;
    }
  }
}

absl::Status CapacityBudget::ReserveIfFree(uint64_t bytes, const std::string& what) {
  absl::MutexLock lock(&mu_);
  const uint64_t free_bytes = capacity_bytes_ > used_bytes_ ? capacity_bytes_ - used_bytes_ : 0;
  if (bytes > free_bytes) return NotFree(what, bytes, free_bytes, capacity_bytes_);
  used_bytes_ += bytes;
  return absl::OkStatus();
}

void CapacityBudget::Release(uint64_t bytes) {
  absl::MutexLock lock(&mu_);
  used_bytes_ = bytes > used_bytes_ ? 0 : used_bytes_ - bytes;
}

bool CapacityBudget::Charge(uint64_t bytes) {
  absl::MutexLock lock(&mu_);
  used_bytes_ += bytes;
  return used_bytes_ <= capacity_bytes_;
}

int CapacityBudget::AddReclaimer(Reclaimer reclaimer) {
  absl::MutexLock lock(&mu_);
  const int id = next_reclaimer_id_++;
  reclaimers_[id] = std::move(reclaimer);
  return id;
}

void CapacityBudget::RemoveReclaimer(int id) {
  absl::MutexLock reclaim_lock(&reclaim_mu_);  // waits for a running reclaim to finish
  absl::MutexLock lock(&mu_);
  reclaimers_.erase(id);
}

uint64_t CapacityBudget::used_bytes() const {
  absl::MutexLock lock(&mu_);
  return used_bytes_;
}

uint64_t CapacityBudget::free_bytes() const {
  absl::MutexLock lock(&mu_);
  return capacity_bytes_ > used_bytes_ ? capacity_bytes_ - used_bytes_ : 0;
}

}  // namespace tessera
