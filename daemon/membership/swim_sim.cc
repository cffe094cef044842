#include "daemon/membership/swim_sim.h"

#include <algorithm>
#include <utility>

namespace tessera {

SwimSimulation::SwimSimulation(Options options) : options_(options), rng_(options.seed) {}

size_t SwimSimulation::Add(Swim::Options options, int64_t start_ms) {
  const uint32_t index = static_cast<uint32_t>(daemons_.size());
  options.names = names_;
  options.send = [this, index](const std::string& address, SwimMessage&& message) {
    Send(index, address, std::move(message));
  };
  Daemon d;
  d.address = names_->addresses.Intern(options.self_address);
  d.swim = std::make_unique<Swim>(std::move(options));
  by_address_[d.address] = index;
  d.wake_ms = std::max(now_ms_, start_ms);
  daemons_.push_back(std::move(d));
  Push(daemons_.back().wake_ms, EventKind::kWake, index, 0);
  return index;
}

void SwimSimulation::Kill(size_t i) { daemons_[i].killed = true; }

void SwimSimulation::Partition(size_t i, bool cut_off) { daemons_[i].cut_off = cut_off; }

uint32_t SwimSimulation::NewSlot() {
  if (!free_slots_.empty()) {
    const uint32_t slot = free_slots_.back();
    free_slots_.pop_back();
    return slot;
  }
  slots_.emplace_back();
  return static_cast<uint32_t>(slots_.size() - 1);
}

void SwimSimulation::Push(int64_t at_ms, EventKind kind, uint32_t daemon, uint32_t slot) {
  events_.push(Event{at_ms, order_++, kind, daemon, slot});
}

void SwimSimulation::Reschedule(uint32_t daemon) {
  Daemon& d = daemons_[daemon];
  if (d.killed) return;
  const int64_t wake = std::max(now_ms_, d.swim->NextWakeMs());
  if (d.wake_ms >= 0 && d.wake_ms <= wake) return;  // an earlier wake is queued: it reschedules
  d.wake_ms = wake;
  Push(wake, EventKind::kWake, daemon, 0);
}

bool SwimSimulation::Transmit(EventKind kind, uint32_t from, uint32_t to, uint64_t seq,
                              SwimMessage&& message, absl::Status status) {
  ++counters_.sent;
  counters_.max_updates = std::max(counters_.max_updates, message.updates.size());
  if (options_.loss_rate > 0 &&
      std::uniform_real_distribution<double>(0, 1)(rng_) < options_.loss_rate) {
    ++counters_.lost;
    return false;
  }
  int64_t delay = options_.one_way_ms;
  if (options_.jitter_ms > 0) {
    delay += static_cast<int64_t>(rng_() % static_cast<uint64_t>(options_.jitter_ms + 1));
  }
  const uint32_t slot = NewSlot();
  Slot& s = slots_[slot];
  s.from = from;
  s.to = to;
  s.seq = seq;
  s.message = std::move(message);
  s.status = std::move(status);
  Push(now_ms_ + delay, kind, 0, slot);
  return true;
}

void SwimSimulation::Send(uint32_t from, const std::string& address, SwimMessage&& message) {
  const std::optional<uint32_t> id = names_->addresses.Find(address);
  auto it = id ? by_address_.find(*id) : by_address_.end();
  if (it == by_address_.end() || Down(from)) {
    ++counters_.sent;
    ++counters_.dropped;  // nobody there, or the sender is cut off
    return;
  }
  const uint64_t seq = message.seq;
  Transmit(EventKind::kRequest, from, it->second, seq, std::move(message), absl::OkStatus());
}

void SwimSimulation::Deliver(const Event& e) {
  if (e.kind == EventKind::kWake) {
    Daemon& d = daemons_[e.daemon];
    if (d.wake_ms != e.at_ms || d.killed) return;  // superseded by an earlier wake
    d.wake_ms = -1;
    d.swim->Tick(now_ms_);
    Reschedule(e.daemon);
    return;
  }
  Slot& s = slots_[e.slot];
  const uint32_t from = s.from, to = s.to;
  const uint64_t seq = s.seq;
  SwimMessage message = std::move(s.message);
  absl::Status status = std::move(s.status);
  free_slots_.push_back(e.slot);
  switch (e.kind) {
    case EventKind::kRequest: {
      if (Down(to)) {
        ++counters_.dropped;
        return;
      }
      absl::StatusOr<SwimMessage> reply = daemons_[to].swim->HandleRequest(now_ms_, message);
      Reschedule(to);
      if (Down(to)) return;  // killed by an event callback
      if (reply.ok()) {
        Transmit(EventKind::kReply, from, to, seq, *std::move(reply), absl::OkStatus());
      } else {
        ++counters_.refused;
        Transmit(EventKind::kFailure, from, to, seq, SwimMessage(), reply.status());
      }
      return;
    }
    case EventKind::kReply:
    case EventKind::kFailure:
      if (Down(from)) {
        ++counters_.dropped;
        return;
      }
      if (e.kind == EventKind::kReply) {
        daemons_[from].swim->HandleReply(now_ms_, seq, message);
      } else {
        daemons_[from].swim->HandleFailure(now_ms_, seq, status);
      }
      Reschedule(from);
      return;
    case EventKind::kWake:
      return;
  }
}

void SwimSimulation::RunUntil(int64_t until_ms) {
  RunUntil(until_ms, [] { return false; });
}

bool SwimSimulation::RunUntil(int64_t until_ms, const std::function<bool()>& done) {
  while (!events_.empty() && events_.top().at_ms <= until_ms) {
    const Event e = events_.top();
    events_.pop();
    now_ms_ = std::max(now_ms_, e.at_ms);
    Deliver(e);
    if (done()) return true;
  }
  now_ms_ = std::max(now_ms_, until_ms);
  return done();
}

}  // namespace tessera
