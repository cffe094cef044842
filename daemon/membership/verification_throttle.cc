#include "daemon/membership/verification_throttle.h"

#include <algorithm>

namespace tessera {

VerificationThrottle::VerificationThrottle(Options options) : options_(options) {
  total_.tokens = options_.total_burst;
  total_.at = absl::InfinitePast();
}

void VerificationThrottle::Refill(Bucket* bucket, int burst, absl::Duration interval,
                                  absl::Time now) {
  if (now <= bucket->at) return;
  if (bucket->at == absl::InfinitePast()) {
    bucket->tokens = burst;
  } else {
    bucket->tokens = std::min<double>(burst, bucket->tokens + (now - bucket->at) / interval);
  }
  bucket->at = now;
}

bool VerificationThrottle::Known(const std::string& source, absl::Time now) const {
  auto it = known_.find(source);
  return it != known_.end() && now - it->second <= options_.known_for;
}

bool VerificationThrottle::Admit(const std::string& source, absl::Time now) {
  if (auto it = failing_.find(source); it != failing_.end()) {
    Bucket& bucket = it->second.bucket;
    Refill(&bucket, options_.source_burst, options_.source_interval, now);
    if (bucket.tokens < 1) return false;
  }
  if (Known(source, now)) return true;
  Refill(&total_, options_.total_burst, options_.total_interval, now);
  return total_.tokens >= 1;
}

void VerificationThrottle::Failed(const std::string& source, absl::Time now) {
  auto it = failing_.find(source);
  if (it == failing_.end()) {
    if (failing_.size() >= options_.max_sources) {
      failing_.erase(failing_lru_.back());
      failing_lru_.pop_back();
    }
    failing_lru_.push_front(source);
    Failing& added = failing_[source];
    added.bucket.at = absl::InfinitePast();
    added.lru = failing_lru_.begin();
    it = failing_.find(source);
  } else {
    failing_lru_.splice(failing_lru_.begin(), failing_lru_, it->second.lru);
  }
  Refill(&it->second.bucket, options_.source_burst, options_.source_interval, now);
  it->second.bucket.tokens -= 1;
  if (!Known(source, now)) {
    Refill(&total_, options_.total_burst, options_.total_interval, now);
    total_.tokens -= 1;
  }
}

void VerificationThrottle::Passed(const std::string& source, absl::Time now) {
  if (known_.size() >= options_.max_sources && known_.count(source) == 0) {
    // Only sources whose datagrams authenticated get here: drop the ones not heard lately.
    for (auto it = known_.begin(); it != known_.end();) {
      it = now - it->second > options_.known_for ? known_.erase(it) : std::next(it);
    }
    if (known_.size() >= options_.max_sources) known_.clear();
  }
  known_[source] = now;
}

}  // namespace tessera
