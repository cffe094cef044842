// SwimSimulation: real Swim cores over a simulated network and clock, deterministic from a seed
// (FoundationDB-style). Every message takes one_way_ms (plus up to jitter_ms) and is lost with
// probability loss_rate; a request is answered by the addressee's Swim::HandleRequest at once
// (its reply travels back the same way) or, when refused, by a failure the sender sees as a
// refused RPC. A killed or partitioned daemon drops what it would send and receive, silently, as a
// hung host does: nobody gets a fast "connection refused".
//
// Used by daemon/membership/swim_test.cc and bench/cluster_sim.cc. Thousands of daemons: the
// Swims share one SwimNames; messages wait in a slab, and the event queue holds only small
// records.
// Not thread-safe.
#ifndef TESSERA_DAEMON_MEMBERSHIP_SWIM_SIM_H_
#define TESSERA_DAEMON_MEMBERSHIP_SWIM_SIM_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <queue>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "daemon/membership/swim.h"

namespace tessera {

class SwimSimulation {
 public:
  struct Options {
    uint64_t seed = 1;
    int64_t one_way_ms = 1;  // half the round-trip time
    int64_t jitter_ms = 0;   // each message takes one_way_ms + uniform [0, jitter_ms]
    double loss_rate = 0;    // each message (request or reply) independently
  };

  explicit SwimSimulation(Options options);

  // Adds a daemon and returns its index. `options.send` and `options.names` are set here;
  // `options.on_event`, when set, is called with the simulation's clock already advanced.
  // A daemon at an address already in use takes the address over (a restart there). Its first
  // protocol period starts at start_ms (-1: now), which sets its phase.
  // REQUIRES: Swim::ValidateOptions(options) would pass once send is set.
  size_t Add(Swim::Options options, int64_t start_ms = -1);
  Swim& swim(size_t i) { return *daemons_[i].swim; }
  const Swim& swim(size_t i) const { return *daemons_[i].swim; }
  size_t size() const { return daemons_.size(); }
  int64_t now_ms() const { return now_ms_; }
  const std::shared_ptr<SwimNames>& names() const { return names_; }

  // The process is gone: it neither runs nor answers, and its messages in flight are lost.
  void Kill(size_t i);
  bool killed(size_t i) const { return daemons_[i].killed; }
  // Cut off (true) or reconnected (false): it keeps running, but every message to or from it is
  // lost while cut off.
  void Partition(size_t i, bool cut_off);

  // Runs every event due up to and including `until_ms`; the clock then reads until_ms.
  void RunUntil(int64_t until_ms);
  // Runs until done() or until `until_ms`; returns whether done() became true. done() is checked
  // after each event.
  bool RunUntil(int64_t until_ms, const std::function<bool()>& done);

  struct Counters {
    uint64_t sent = 0;       // requests and replies handed to the network
    uint64_t lost = 0;       // of those, lost to loss_rate
    uint64_t dropped = 0;    // of those, dropped at a killed or cut-off daemon
    uint64_t refused = 0;    // requests answered by an error
    size_t max_updates = 0;  // the most updates one message carried
  };
  const Counters& counters() const { return counters_; }

 private:
  struct Daemon {
    std::unique_ptr<Swim> swim;
    uint32_t address = 0;  // SwimNames::addresses id
    bool killed = false;
    bool cut_off = false;
    int64_t wake_ms = -1;  // the earliest wake queued
  };
  enum class EventKind : uint8_t { kWake, kRequest, kReply, kFailure };
  struct Event {
    int64_t at_ms;
    uint64_t order;  // ties run in the order queued
    EventKind kind;
    uint32_t daemon;  // kWake
    uint32_t slot;    // messages: index into slots_
    bool operator>(const Event& o) const {
      return at_ms != o.at_ms ? at_ms > o.at_ms : order > o.order;
    }
  };
  struct Slot {
    uint32_t from = 0;  // daemon index of the requester
    uint32_t to = 0;    // daemon index of the addressee (kRequest)
    uint64_t seq = 0;
    SwimMessage message;
    absl::Status status;
  };

  void Send(uint32_t from, const std::string& address, SwimMessage&& message);
  // Queues a message event unless it is lost; returns whether it was queued.
  bool Transmit(EventKind kind, uint32_t from, uint32_t to, uint64_t seq, SwimMessage&& message,
                absl::Status status);
  void Deliver(const Event& e);
  void Reschedule(uint32_t daemon);
  void Push(int64_t at_ms, EventKind kind, uint32_t daemon, uint32_t slot);
  uint32_t NewSlot();
  bool Down(uint32_t daemon) const { return daemons_[daemon].killed || daemons_[daemon].cut_off; }

  const Options options_;
  std::shared_ptr<SwimNames> names_ = std::make_shared<SwimNames>();
  std::mt19937_64 rng_;
  int64_t now_ms_ = 0;
  uint64_t order_ = 0;
  std::vector<Daemon> daemons_;
  std::unordered_map<uint32_t, uint32_t> by_address_;  // address id -> daemon index
  std::priority_queue<Event, std::vector<Event>, std::greater<Event>> events_;
  std::vector<Slot> slots_;
  std::vector<uint32_t> free_slots_;
  Counters counters_;
};

}  // namespace tessera

#endif  // TESSERA_DAEMON_MEMBERSHIP_SWIM_SIM_H_
