// Metrics: counters, gauges and histograms rendered in the Prometheus text exposition format
// (version 0.0.4), served by the daemon at /metrics (metrics.listen_address).
//
// A metric is created once, by name and label set, and lives as long as its registry; the
// returned pointer is then updated from any thread without a lock (Counter and Gauge are one
// atomic; Histogram is one atomic per bucket plus count and sum). Values that already exist
// elsewhere (bytes used, peers alive) are not copied into gauges: a collector reports them when
// the registry is rendered.
//
//   Counter* seals = registry.AddCounter("tessera_snapshot_seals_total", "Snapshots sealed.");
//   seals->Increment();
//   registry.AddCollector([&] { return std::vector<Sample>{{"tessera_store_used_bytes", ...}}; });
//   std::string text = registry.Render();
//
// Thread-safety: every method may be called concurrently.
#ifndef TESSERA_DAEMON_METRICS_METRICS_H_
#define TESSERA_DAEMON_METRICS_METRICS_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace tessera {

// Label names and values, e.g. {{"source", "rebuild"}}. Names are [a-zA-Z_][a-zA-Z0-9_]*.
using MetricLabels = std::vector<std::pair<std::string, std::string>>;

class Counter {
 public:
  void Increment(uint64_t n = 1) { value_.fetch_add(n, std::memory_order_relaxed); }
  uint64_t value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> value_{0};
};

class Gauge {
 public:
  void Set(double value) { value_.store(value, std::memory_order_relaxed); }
  void Add(double delta);
  double value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0};
};

class Histogram {
 public:
  // `upper_bounds`: strictly increasing, finite; +Inf is implied.
  explicit Histogram(std::vector<double> upper_bounds);
  void Observe(double value);

  struct Snapshot {
    std::vector<double> upper_bounds;
    std::vector<uint64_t> cumulative_counts;  // parallel to upper_bounds, then +Inf
    uint64_t count = 0;
    double sum = 0;
  };
  Snapshot snapshot() const;

 private:
  const std::vector<double> upper_bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;  // upper_bounds_.size() + 1 (+Inf)
  std::atomic<uint64_t> count_{0};
  std::atomic<double> sum_{0};
};

// Bounds for durations in seconds, from 1 ms to 5 minutes.
std::vector<double> DurationBucketsSeconds();

class MetricsRegistry {
 public:
  // One value reported by a collector at render time.
  struct Sample {
    std::string name;
    std::string help;
    std::string type;  // "gauge" or "counter"
    MetricLabels labels;
    double value = 0;
  };
  using Collector = std::function<std::vector<Sample>()>;

  // Creates the metric, or returns the existing one with the same name and labels. A name that
  // is not a valid Prometheus metric name, or that is already registered with another type, is
  // a programming error: the process aborts with a message naming it.
  Counter* AddCounter(const std::string& name, const std::string& help,
                      const MetricLabels& labels = {});
  Gauge* AddGauge(const std::string& name, const std::string& help,
                  const MetricLabels& labels = {});
  Histogram* AddHistogram(const std::string& name, const std::string& help,
                          std::vector<double> upper_bounds, const MetricLabels& labels = {});

  // Adds a function called by every Render. Returns an id for RemoveCollector, which waits
  // until no Render is calling it.
  int AddCollector(Collector collector);
  void RemoveCollector(int id);

  // Every metric in the text exposition format: per family one # HELP and one # TYPE line, then
  // its samples; families sorted by name.
  std::string Render() const;

 private:
  struct Family {
    std::string help;
    std::string type;  // "counter", "gauge", "histogram"
    std::map<MetricLabels, std::unique_ptr<Counter>> counters;
    std::map<MetricLabels, std::unique_ptr<Gauge>> gauges;
    std::map<MetricLabels, std::unique_ptr<Histogram>> histograms;
  };
  Family* FamilyFor(const std::string& name, const std::string& help, const std::string& type,
                    const MetricLabels& labels) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  mutable absl::Mutex collectors_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  std::map<int, Collector> collectors_ ABSL_GUARDED_BY(collectors_mu_);
  int next_collector_id_ ABSL_GUARDED_BY(collectors_mu_) = 1;
  mutable absl::Mutex mu_;
  std::map<std::string, Family> families_ ABSL_GUARDED_BY(mu_);
};

// The process's registry, which /metrics serves.
MetricsRegistry& GlobalMetrics();

// The daemon's own event metrics, registered in GlobalMetrics() on first use. What the stores,
// the cluster and the protection pipeline already count (seals, bytes, fragments, peers, CRC
// failures, commits, rebuilds) is reported by the daemon's collector instead.
struct DaemonMetrics {
  Counter* skips;                 // snapshots the agents skipped, as they report them
  Counter* begin_refused;         // BeginSnapshot answered UNAVAILABLE (slot busy, not committed)
  Histogram* protection_seconds;  // from seal to protected
  Histogram* restore_seconds;     // making a shard local from other members (copy or rebuild)
  Counter* restore_failures;      // shards that could not be made local
  // Restore questions answered UNAVAILABLE because this coordinator's view could not decide
  // (membership not converged, no majority of members live, a node of the job not answering).
  Counter* restore_deferred;
  // Sealed slots found damaged when read for protection (their payload no longer matches the
  // CRC32C of the seal): not protected from.
  Counter* slot_crc_failures;
  // Fragments sent to a spare member because the member placed for them is live but could not be
  // reached from here (a cut link, a stalled daemon).
  Counter* fragments_rerouted;
  // Fragments found damaged by a read (verification, a rebuild) rather than by the fragment
  // store's own checks; not exported alone: the collector adds them to the store's count.
  Counter* fragment_crc_failures;
  // Agent-socket connections closed at once because the daemon had no file descriptor left.
  Counter* connections_shed;
  Counter* connections_over_uid_cap;
};
const DaemonMetrics& Metrics();

}  // namespace tessera

#endif  // TESSERA_DAEMON_METRICS_METRICS_H_
