#include "daemon/refusals.h"

#include <map>
#include <string>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/grpc_status.h"
#include "common/logging.h"
#include "daemon/metrics/metrics.h"

namespace tessera {
namespace {

// Per kind: at most kLinesPerWindow lines in each window of kWindowNs, so that distinct
// refusals of normal operation are all seen, and a flood costs a few lines per second.
constexpr int64_t kWindowNs = 10'000'000'000;
constexpr int kLinesPerWindow = 20;

struct Key {
  std::string service;
  std::string method;
  absl::StatusCode code;
  bool operator<(const Key& o) const {
    return std::tie(service, method, code) < std::tie(o.service, o.method, o.code);
  }
};

struct Entry {
  Counter* counter = nullptr;
  int64_t window_start_ns = 0;  // 0: nothing logged yet
  int lines_in_window = 0;
  uint64_t unlogged = 0;        // refusals not logged since the last line
};

// Bounded by the services' methods times the status codes.
absl::Mutex mu;
std::map<Key, Entry>* entries ABSL_GUARDED_BY(mu) = new std::map<Key, Entry>();
std::function<int64_t()>* clock ABSL_GUARDED_BY(mu) = nullptr;

}  // namespace

void SetRefusalClockForTesting(std::function<int64_t()> now_ns) {
  absl::MutexLock lock(&mu);
  delete clock;
  clock = now_ns ? new std::function<int64_t()>(std::move(now_ns)) : nullptr;
}

void RecordRefusal(const char* service, const char* method, const absl::Status& status) {
  uint64_t unlogged = 0;
  {
    absl::MutexLock lock(&mu);
    const int64_t now = clock != nullptr ? (*clock)() : absl::GetCurrentTimeNanos();
    Entry& e = (*entries)[Key{service, method, status.code()}];
    if (e.counter == nullptr) {
      e.counter = GlobalMetrics().AddCounter(
          "tessera_rpc_refusals_total",
          "Requests to the daemon's services (agent socket; admin, peer, coordination, "
          "rendezvous on the peer port) that failed, by service, method and status code "
          "(logged at most 20 lines per 10 s per kind).",
          {{"service", service},
           {"method", method},
           {"code", absl::StatusCodeToString(status.code())}});
    }
    e.counter->Increment();
    if (e.window_start_ns == 0 || now - e.window_start_ns >= kWindowNs) {
      e.window_start_ns = now;
      e.lines_in_window = 0;
    }
    if (e.lines_in_window >= kLinesPerWindow) {
      ++e.unlogged;
      return;
    }
    ++e.lines_in_window;
    unlogged = e.unlogged;
    e.unlogged = 0;
  }
  Logger(absl::StrCat(service, "-service"))
      ->warn("{}: {}{}", method, status.ToString(),
             unlogged == 0 ? std::string()
                           : absl::StrCat(" (and ", unlogged, " more ", method, " ",
                                          absl::StatusCodeToString(status.code()),
                                          " since the last such line)"));
}

uint64_t RefusalCount(const char* service, const char* method, absl::StatusCode code) {
  absl::MutexLock lock(&mu);
  auto it = entries->find(Key{service, method, code});
  return it == entries->end() ? 0 : it->second.counter->value();
}

grpc::Status AnswerCall(const char* service, const char* method, const absl::Status& status) {
  if (!status.ok()) RecordRefusal(service, method, status);
  return ToGrpcStatus(status);
}

}  // namespace tessera
