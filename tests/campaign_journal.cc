#include "tests/campaign_journal.h"

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace tessera::testing {
namespace {

constexpr int64_t kOpen = std::numeric_limits<int64_t>::max();

std::string Hex(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016" PRIx64, v);
  return buf;
}

}  // namespace

void Journal::Snapshotted(int rank, uint64_t launch, int64_t step, uint64_t digest) {
  digests_[rank][launch][step] = digest;
}

uint64_t Journal::Owner(int rank, int64_t step, uint64_t digest) const {
  auto r = digests_.find(rank);
  if (r == digests_.end()) return 0;
  for (const auto& [launch, steps] : r->second) {
    auto s = steps.find(step);
    if (s != steps.end() && s->second == digest) return launch;
  }
  return 0;
}

std::string Journal::CheckRestored(int rank, int64_t step, uint64_t digest) const {
  auto h = current_.find(rank);
  const History empty;
  const History& history = h == current_.end() ? empty : h->second;
  std::string expected = "no launch of the history snapshotted that step";
  for (const Segment& s : history) {
    if (step <= s.after || step > s.through) continue;
    auto r = digests_.find(rank);
    if (r != digests_.end()) {
      auto l = r->second.find(s.launch);
      if (l != r->second.end()) {
        auto d = l->second.find(step);
        if (d != l->second.end()) {
          if (d->second == digest) return "";
          expected = absl::StrCat("launch L", s.launch, " of the history snapshotted ",
                                  Hex(d->second), " at that step");
        } else {
          expected = absl::StrCat("launch L", s.launch, " of the history did not snapshot it");
        }
      }
    }
  }
  const uint64_t owner = Owner(rank, step, digest);
  const std::string bytes =
      owner == 0 ? "bytes that no launch of this rank snapshotted"
                 : absl::StrCat("the bytes of launch L", owner, ", abandoned by the history");
  return absl::StrCat("rank ", rank, " restored step ", step, " with ", bytes, " (digest ",
                      Hex(digest), "); the history it resumed is ", Describe(history), ", and ",
                      expected);
}

void Journal::Resumed(int rank, uint64_t launch, int64_t step, uint64_t digest) {
  const uint64_t owner = Owner(rank, step, digest);
  auto parent = owner != 0 ? of_launch_.find({rank, owner}) : of_launch_.end();
  const History base = parent != of_launch_.end() ? parent->second : current_[rank];
  History history;
  for (Segment s : base) {
    if (s.after >= step) continue;
    s.through = std::min(s.through, step);
    history.push_back(s);
  }
  history.push_back({launch, step, kOpen});
  of_launch_[{rank, launch}] = history;
  current_[rank] = std::move(history);
}

void Journal::Fresh(int rank, uint64_t launch) {
  History history = {{launch, 0, kOpen}};
  of_launch_[{rank, launch}] = history;
  current_[rank] = std::move(history);
}

std::string Journal::Describe(int rank) const {
  auto h = current_.find(rank);
  return h == current_.end() ? "(none)" : Describe(h->second);
}

std::string Journal::Describe(const History& history) {
  if (history.empty()) return "(none)";
  return absl::StrJoin(history, " ", [](std::string* out, const Segment& s) {
    absl::StrAppend(out, "L", s.launch, "(", s.after, "..",
                    s.through == kOpen ? std::string() : absl::StrCat(s.through), "]");
  });
}

size_t Journal::SnapshotCount(int rank) const {
  size_t n = 0;
  auto r = digests_.find(rank);
  if (r == digests_.end()) return 0;
  for (const auto& [launch, steps] : r->second) n += steps.size();
  return n;
}

}  // namespace tessera::testing
