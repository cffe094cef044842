#include "daemon/membership/replay_window.h"

#include "absl/strings/str_cat.h"

namespace tessera {

ReplayWindow::Window *ReplayWindow::Find(Node *node, uint64_t incarnation) {
  for (Window &w : node->windows) {
    if (w.incarnation == incarnation) return &w;
  }
  return nullptr;
}

bool ReplayWindow::Older(const Node &node, uint64_t incarnation) {
  for (const Window &w : node.windows) {
    if (w.incarnation == 0 || w.incarnation < incarnation) return false;
  }
  return true;
}

absl::Status ReplayWindow::Seen(const Window &w, const std::string &node, uint64_t sequence) {
  if (sequence > w.highest) return absl::OkStatus();
  const uint64_t behind = w.highest - sequence;
  if (behind >= kWindow) {
    return absl::AlreadyExistsError(absl::StrCat(
        "a datagram of node '", node, "' incarnation ", w.incarnation, " numbered ", sequence,
        ", below the window (", kWindow, " under ", w.highest, ", the highest taken): a replay"));
  }
  if (w.seen[behind]) {
    return absl::AlreadyExistsError(absl::StrCat("a datagram of node '", node, "' incarnation ",
                                                 w.incarnation, " numbered ", sequence,
                                                 ", taken already: a replay"));
  }
  return absl::OkStatus();
}

absl::Status ReplayWindow::Check(const std::string &node, uint64_t incarnation, uint64_t sequence,
                                 absl::Time now) {
  auto it = nodes_.find(node);
  if (it == nodes_.end()) return absl::OkStatus();
  if (const Window *w = Find(&it->second, incarnation)) return Seen(*w, node, sequence);
  if (!Older(it->second, incarnation)) return absl::OkStatus();  // a newer incarnation
  // Spent by forgeries too: what an older incarnation's datagrams cost is one
  // check a period.
  if (now - it->second.older_checked_at >= options_.older_interval) {
    it->second.older_checked_at = now;
    return absl::OkStatus();
  }
  return absl::AlreadyExistsError(
      absl::StrCat("a datagram of node '", node, "' incarnation ", incarnation,
                   ", older than the incarnations taken from it since (one "
                   "such is checked per ",
                   absl::FormatDuration(options_.older_interval), ")"));
}

absl::Status ReplayWindow::Accept(const std::string &node, uint64_t incarnation,
                                  uint64_t sequence) {
  auto it = nodes_.find(node);
  if (it == nodes_.end()) {
    if (nodes_.size() >= options_.max_nodes) {
      auto least = nodes_.begin();
      for (auto n = nodes_.begin(); n != nodes_.end(); ++n) {
        if (n->second.last_accepted < least->second.last_accepted) least = n;
      }
      nodes_.erase(least);
    }
    it = nodes_.emplace(node, Node()).first;
  }
  Node &n = it->second;
  Window *w = Find(&n, incarnation);
  if (w == nullptr) {
    if (Older(n, incarnation)) return absl::OkStatus();  // taken, within its allowance
    // A new incarnation: a fresh window, in place of an unused or the oldest
    // one.
    w = &n.windows[0];
    for (Window &other : n.windows) {
      if (other.incarnation < w->incarnation) w = &other;
    }
    *w = Window{incarnation, sequence, {}};
    w->seen.set(0);
  } else {
    if (absl::Status s = Seen(*w, node, sequence); !s.ok()) return s;
    if (sequence > w->highest) {
      const uint64_t ahead = sequence - w->highest;
      w->seen = ahead >= kWindow ? std::bitset<kWindow>() : w->seen << ahead;
      w->highest = sequence;
    }
    w->seen.set(w->highest - sequence);
  }
  n.last_accepted = ++accepted_;
  return absl::OkStatus();
}

}  // namespace tessera
