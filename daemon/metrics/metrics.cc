#include "daemon/metrics/metrics.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"

namespace tessera {
namespace {

bool ValidName(const std::string& name, bool allow_colon) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool letter =
        (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (allow_colon && c == ':');
    if (!letter && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

[[noreturn]] void Die(const std::string& message) {
  std::fprintf(stderr, "tesserad: metrics: %s\n", message.c_str());
  std::abort();
}

void CheckLabels(const std::string& name, const MetricLabels& labels) {
  for (const auto& [label, value] : labels) {
    if (!ValidName(label, /*allow_colon=*/false) || label == "le") {
      Die(absl::StrCat("metric ", name, ": invalid label name '", label, "'"));
    }
  }
}

void AtomicAdd(std::atomic<double>* target, double delta) {
  double current = target->load(std::memory_order_relaxed);
  while (!target->compare_exchange_weak(current, current + delta, std::memory_order_relaxed)) {
  }
}

// A sample value: integers exactly, others with full precision.
std::string FormatValue(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  if (value == std::floor(value) && std::fabs(value) < 9007199254740992.0) {
    return absl::StrCat(static_cast<int64_t>(value));
  }
  // The shortest form that reads back exactly ("0.025", not "0.025000000000000001").
  char buffer[32];
  for (int precision = 15; precision <= 17; ++precision) {
    std::snprintf(buffer, sizeof(buffer), "%.*g", precision, value);
    if (std::strtod(buffer, nullptr) == value) break;
  }
  return buffer;
}

// Backslash and newline escaped, as HELP text needs; label values also escape '"'.
std::string Escape(const std::string& text, bool quotes) {
  std::string out;
  for (char c : text) {
    if (c == '\\' || c == '\n' || (quotes && c == '"')) out += '\\';
    out += c == '\n' ? 'n' : c;
  }
  return out;
}

// `{a="x",le="1"}`, or nothing without labels.
std::string FormatLabels(const MetricLabels& labels, const std::string& le = "") {
  if (labels.empty() && le.empty()) return "";
  std::string out = "{";
  for (const auto& [name, value] : labels) {
    if (out.size() > 1) out += ",";
    absl::StrAppend(&out, name, "=\"", Escape(value, /*quotes=*/true), "\"");
  }
  if (!le.empty()) absl::StrAppend(&out, out.size() > 1 ? "," : "", "le=\"", le, "\"");
  return out + "}";
}

}  // namespace

void Gauge::Add(double delta) { AtomicAdd(&value_, delta); }

Histogram::Histogram(std::vector<double> upper_bounds)
    : upper_bounds_(std::move(upper_bounds)),
      buckets_(new std::atomic<uint64_t>[upper_bounds_.size() + 1]) {
  for (size_t i = 0; i <= upper_bounds_.size(); ++i) buckets_[i].store(0);
  for (size_t i = 0; i < upper_bounds_.size(); ++i) {
    if (!std::isfinite(upper_bounds_[i]) || (i > 0 && upper_bounds_[i] <= upper_bounds_[i - 1])) {
      Die("histogram bounds must be finite and strictly increasing");
    }
  }
}

void Histogram::Observe(double value) {
  size_t i = 0;
  while (i < upper_bounds_.size() && value > upper_bounds_[i]) ++i;
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
  AtomicAdd(&sum_, value);
}

Histogram::Snapshot Histogram::snapshot() const {
  Snapshot s;
  s.upper_bounds = upper_bounds_;
  uint64_t running = 0;
  for (size_t i = 0; i <= upper_bounds_.size(); ++i) {
    running += buckets_[i].load(std::memory_order_relaxed);
    s.cumulative_counts.push_back(running);
  }
  // count_ and the buckets are updated apart: report the buckets' total so that the +Inf bucket
  // and _count always agree.
  s.count = running;
  s.sum = sum_.load(std::memory_order_relaxed);
  return s;
}

std::vector<double> DurationBucketsSeconds() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300};
}

MetricsRegistry::Family* MetricsRegistry::FamilyFor(const std::string& name,
                                                    const std::string& help,
                                                    const std::string& type,
                                                    const MetricLabels& labels) {
  if (!ValidName(name, /*allow_colon=*/true)) Die(absl::StrCat("invalid metric name '", name, "'"));
  CheckLabels(name, labels);
  Family& family = families_[name];
  if (family.type.empty()) {
    family.type = type;
    family.help = help;
  } else if (family.type != type) {
    Die(absl::StrCat("metric ", name, " is a ", family.type, ", not a ", type));
  }
  return &family;
}

Counter* MetricsRegistry::AddCounter(const std::string& name, const std::string& help,
                                     const MetricLabels& labels) {
  absl::MutexLock lock(&mu_);
  auto& slot = FamilyFor(name, help, "counter", labels)->counters[labels];
  if (!slot) slot = std::make_unique<Counter>();
  return slot.get();
}

Gauge* MetricsRegistry::AddGauge(const std::string& name, const std::string& help,
                                 const MetricLabels& labels) {
  absl::MutexLock lock(&mu_);
  auto& slot = FamilyFor(name, help, "gauge", labels)->gauges[labels];
  if (!slot) slot = std::make_unique<Gauge>();
  return slot.get();
}

Histogram* MetricsRegistry::AddHistogram(const std::string& name, const std::string& help,
                                         std::vector<double> upper_bounds,
                                         const MetricLabels& labels) {
  absl::MutexLock lock(&mu_);
  auto& slot = FamilyFor(name, help, "histogram", labels)->histograms[labels];
  if (!slot) slot = std::make_unique<Histogram>(std::move(upper_bounds));
  return slot.get();
}

int MetricsRegistry::AddCollector(Collector collector) {
  absl::MutexLock lock(&collectors_mu_);
  const int id = next_collector_id_++;
  collectors_[id] = std::move(collector);
  return id;
}

void MetricsRegistry::RemoveCollector(int id) {
  absl::MutexLock lock(&collectors_mu_);  // waits for a Render that is calling it
  collectors_.erase(id);
}

std::string MetricsRegistry::Render() const {
  // Collected samples, grouped into families by name.
  std::map<std::string, std::pair<Sample, std::vector<Sample>>> collected;
  {
    absl::MutexLock lock(&collectors_mu_);
    for (const auto& [id, collector] : collectors_) {
      for (Sample& sample : collector()) {
        auto& entry = collected[sample.name];
        if (entry.second.empty()) entry.first = sample;
        entry.second.push_back(std::move(sample));
      }
    }
  }
  std::map<std::string, std::string> text;  // by family name
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [name, family] : families_) {
      std::string& out = text[name];
      absl::StrAppend(&out, "# HELP ", name, " ", Escape(family.help, /*quotes=*/false),
                      "\n# TYPE ", name, " ", family.type, "\n");
      for (const auto& [labels, counter] : family.counters) {
        absl::StrAppend(&out, name, FormatLabels(labels), " ", counter->value(), "\n");
      }
      for (const auto& [labels, gauge] : family.gauges) {
        absl::StrAppend(&out, name, FormatLabels(labels), " ", FormatValue(gauge->value()), "\n");
      }
      for (const auto& [labels, histogram] : family.histograms) {
        const Histogram::Snapshot s = histogram->snapshot();
        for (size_t i = 0; i < s.upper_bounds.size(); ++i) {
          absl::StrAppend(&out, name, "_bucket",
                          FormatLabels(labels, FormatValue(s.upper_bounds[i])), " ",
                          s.cumulative_counts[i], "\n");
        }
        absl::StrAppend(&out, name, "_bucket", FormatLabels(labels, "+Inf"), " ", s.count, "\n",
                        name, "_sum", FormatLabels(labels), " ", FormatValue(s.sum), "\n", name,
                        "_count", FormatLabels(labels), " ", s.count, "\n");
      }
    }
  }
  for (const auto& [name, entry] : collected) {
    if (text.count(name) > 0 || !ValidName(name, /*allow_colon=*/true)) continue;
    std::string& out = text[name];
    absl::StrAppend(&out, "# HELP ", name, " ", Escape(entry.first.help, /*quotes=*/false),
                    "\n# TYPE ", name, " ", entry.first.type == "counter" ? "counter" : "gauge",
                    "\n");
    for (const Sample& sample : entry.second) {
      absl::StrAppend(&out, name, FormatLabels(sample.labels), " ", FormatValue(sample.value),
                      "\n");
    }
  }
  std::string all;
  for (const auto& [name, family_text] : text) all += family_text;
  return all;
}

MetricsRegistry& GlobalMetrics() {
  static MetricsRegistry* const registry = new MetricsRegistry();
  return *registry;
}

const DaemonMetrics& Metrics() {
  static const DaemonMetrics metrics = [] {
    MetricsRegistry& r = GlobalMetrics();
    DaemonMetrics m;
    m.skips = r.AddCounter("tessera_snapshot_skips_total",
                           "Snapshots the trainers on this node skipped, as their agents report "
                           "them (the previous snapshot was still in flight).");
    m.begin_refused = r.AddCounter(
        "tessera_snapshot_begin_refused_total",
        "Snapshots the daemon could not take yet (the slot was being protected, or its step "
        "not committed): the agent skips or retries them.");
    m.protection_seconds = r.AddHistogram(
        "tessera_protection_latency_seconds",
        "Time from a snapshot's seal to its shard being protected on k+m other members.",
        DurationBucketsSeconds());
    m.restore_seconds = r.AddHistogram(
        "tessera_restore_duration_seconds",
        "Time to make a shard local from other members (a whole copy or a rebuild from k "
        "fragments).",
        DurationBucketsSeconds());
    m.restore_failures =
        r.AddCounter("tessera_restore_failures_total",
                     "Shards that could not be made local (too few fragments, a CRC mismatch).");
    m.restore_deferred = r.AddCounter(
        "tessera_restore_questions_deferred_total",
        "Restore questions this daemon, as a job's coordinator, answered UNAVAILABLE because its "
        "view could not decide yet (membership not converged, no majority of the members live, "
        "a node of the job not answering); the trainer asks again.");
    m.slot_crc_failures = r.AddCounter(
        "tessera_slot_crc_failures_total",
        "Sealed slots whose payload no longer matched the CRC32C of their seal when read for "
        "protection (a bit flip in memory, or a trainer writing after the seal); no fragments "
        "are made from them.");
    m.fragments_rerouted = r.AddCounter(
        "tessera_fragments_rerouted_total",
        "Fragments sent to a spare member (the next member outside the placement) because the "
        "member placed for them is live but could not be reached from this daemon: a cut link "
        "or a stalled daemon. Members this daemon cannot reach are avoided for 10 s.");
    m.fragment_crc_failures = new Counter();
    m.connections_shed = r.AddCounter(
        "tessera_agent_connections_shed_total",
        "Connections to the agent socket accepted and closed at once because the daemon had no "
        "file descriptor left (RLIMIT_NOFILE): idle connections of some process hold them.");
    m.connections_over_uid_cap = r.AddCounter(
        "tessera_agent_connections_over_uid_cap_total",
        "Connections to the agent socket closed at once because their uid already held "
        "agent.max_connections_per_uid open connections.");
    return m;
  }();
  return metrics;
}

}  // namespace tessera
