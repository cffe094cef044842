#include "daemon/metrics/metrics.h"

#include <cstdlib>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tessera {
namespace {

using ::testing::HasSubstr;

uint64_t TestSeed() {
  const char* env = std::getenv("TESSERA_TEST_SEED");
  uint64_t seed = env != nullptr ? std::strtoull(env, nullptr, 10) : std::random_device{}();
  std::printf("TESSERA_TEST_SEED=%llu\n", static_cast<unsigned long long>(seed));
  return seed;
}

// A parsed exposition: every sample by "name{labels}", and each family's type. The parser is
// strict: a line it does not understand, or a sample before its family's # TYPE, fails the test.
struct Exposition {
  std::map<std::string, double> samples;
  std::map<std::string, std::string> types;
  std::map<std::string, std::string> helps;
};

// The family a sample name belongs to (histograms add _bucket, _sum, _count).
std::string FamilyOf(const std::string& sample, const std::map<std::string, std::string>& types) {
  for (const char* suffix : {"_bucket", "_sum", "_count"}) {
    const std::string s = suffix;
    if (sample.size() > s.size() && sample.compare(sample.size() - s.size(), s.size(), s) == 0) {
      std::string base = sample.substr(0, sample.size() - s.size());
      auto it = types.find(base);
      if (it != types.end() && it->second == "histogram") return base;
    }
  }
  return sample;
}

Exposition Parse(const std::string& text) {
  Exposition e;
  EXPECT_TRUE(text.empty() || text.back() == '\n');
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    if (absl::StartsWith(line, "# HELP ")) {
      std::vector<std::string> parts = absl::StrSplit(line.substr(7), absl::MaxSplits(' ', 1));
      EXPECT_EQ(parts.size(), 2u) << line;
      EXPECT_EQ(e.helps.count(parts[0]), 0u) << "HELP twice: " << line;
      e.helps[parts[0]] = parts.size() > 1 ? parts[1] : "";
      continue;
    }
    if (absl::StartsWith(line, "# TYPE ")) {
      std::vector<std::string> parts = absl::StrSplit(line.substr(7), ' ');
      EXPECT_EQ(parts.size(), 2u) << line;
      EXPECT_THAT((std::vector<std::string>{"counter", "gauge", "histogram"}),
                  ::testing::Contains(parts[1]))
          << line;
      EXPECT_EQ(e.types.count(parts[0]), 0u) << "TYPE twice: " << line;
      e.types[parts[0]] = parts[1];
      continue;
    }
    EXPECT_NE(line[0], '#') << line;
    const size_t space = line.rfind(' ');
    EXPECT_NE(space, absl::string_view::npos) << line;
    std::string key(line.substr(0, space));
    std::string value_text(line.substr(space + 1));
    double value = 0;
    if (value_text == "+Inf") {
      value = INFINITY;
    } else {
      EXPECT_TRUE(absl::SimpleAtod(value_text, &value)) << line;
    }
    const std::string name = key.substr(0, key.find('{'));
    if (key.find('{') != std::string::npos) {
      EXPECT_EQ(key.back(), '}') << line;
    }
    EXPECT_EQ(e.types.count(FamilyOf(name, e.types)), 1u) << "sample before its TYPE: " << line;
    EXPECT_EQ(e.samples.count(key), 0u) << "sample twice: " << line;
    e.samples[key] = value;
  }
  return e;
}

TEST(MetricsTest, RendersWhatItCountsAndParsesBack) {
  std::mt19937_64 rng(TestSeed());
  MetricsRegistry registry;
  Counter* seals = registry.AddCounter("t_seals_total", "Seals.");
  Counter* by_a = registry.AddCounter("t_by_kind_total", "By kind.", {{"kind", "a"}});
  Counter* by_b = registry.AddCounter("t_by_kind_total", "By kind.", {{"kind", "b\"q\\"}});
  Gauge* used = registry.AddGauge("t_used_bytes", "Bytes used.\nSecond line.");
  Histogram* latency = registry.AddHistogram("t_latency_seconds", "Latency.", {0.1, 1, 10});
  EXPECT_EQ(registry.AddCounter("t_seals_total", "Seals."), seals);  // same name: same counter

  const uint64_t n_seals = rng() % 1000;
  for (uint64_t i = 0; i < n_seals; ++i) seals->Increment();
  by_a->Increment(7);
  by_b->Increment(3);
  const double used_value = static_cast<double>(rng() % (1ull << 50));
  used->Set(used_value);
  std::vector<double> observed;
  std::map<double, uint64_t> expected_le{{0.1, 0}, {1, 0}, {10, 0}};
  double sum = 0;
  for (int i = 0; i < 200; ++i) {
    const double v = std::uniform_real_distribution<double>(0, 20)(rng);
    latency->Observe(v);
    sum += v;
    for (auto& [bound, count] : expected_le) count += v <= bound ? 1 : 0;
  }
  registry.AddCollector([] {
    return std::vector<MetricsRegistry::Sample>{
        {"t_peers", "Peers by state.", "gauge", {{"state", "alive"}}, 3},
        {"t_peers", "Peers by state.", "gauge", {{"state", "suspected"}}, 1}};
  });

  const std::string text = registry.Render();
  SCOPED_TRACE(text);
  Exposition e = Parse(text);
  EXPECT_EQ(e.types["t_seals_total"], "counter");
  EXPECT_EQ(e.types["t_used_bytes"], "gauge");
  EXPECT_EQ(e.types["t_latency_seconds"], "histogram");
  EXPECT_EQ(e.types["t_peers"], "gauge");
  EXPECT_EQ(e.helps["t_used_bytes"], "Bytes used.\\nSecond line.");
  EXPECT_EQ(e.samples["t_seals_total"], static_cast<double>(n_seals));
  EXPECT_EQ(e.samples["t_by_kind_total{kind=\"a\"}"], 7);
  EXPECT_EQ(e.samples["t_by_kind_total{kind=\"b\\\"q\\\\\"}"], 3);
  EXPECT_EQ(e.samples["t_used_bytes"], used_value);  // exact: integers print in full
  for (const auto& [bound, count] : expected_le) {
    const std::string le = bound == 0.1 ? "0.1" : std::to_string(int(bound));
    EXPECT_EQ(e.samples["t_latency_seconds_bucket{le=\"" + le + "\"}"], count) << bound;
  }
  EXPECT_EQ(e.samples["t_latency_seconds_bucket{le=\"+Inf\"}"], 200);
  EXPECT_EQ(e.samples["t_latency_seconds_count"], 200);
  EXPECT_NEAR(e.samples["t_latency_seconds_sum"], sum, 1e-9 * sum);
  EXPECT_EQ(e.samples["t_peers{state=\"alive\"}"], 3);
  EXPECT_EQ(e.samples["t_peers{state=\"suspected\"}"], 1);
}

TEST(MetricsTest, ConcurrentUpdatesAreAllCounted) {
  MetricsRegistry registry;
  Counter* counter = registry.AddCounter("c_total", "C.");
  Gauge* gauge = registry.AddGauge("g", "G.");
  Histogram* histogram = registry.AddHistogram("h_seconds", "H.", DurationBucketsSeconds());
  constexpr int kThreads = 4;
  constexpr int kPerThread = 20000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kPerThread; ++i) {
        counter->Increment();
        gauge->Add(1);
        histogram->Observe(0.5);
      }
    });
  }
  // Rendering while others update must not tear: +Inf always equals _count.
  for (int i = 0; i < 50; ++i) {
    Exposition e = Parse(registry.Render());
    EXPECT_EQ(e.samples["h_seconds_bucket{le=\"+Inf\"}"], e.samples["h_seconds_count"]);
  }
  for (auto& t : threads) t.join();
  Exposition e = Parse(registry.Render());
  EXPECT_EQ(e.samples["c_total"], kThreads * kPerThread);
  EXPECT_EQ(e.samples["g"], kThreads * kPerThread);
  EXPECT_EQ(e.samples["h_seconds_count"], kThreads * kPerThread);
  EXPECT_EQ(e.samples["h_seconds_bucket{le=\"0.25\"}"], 0);
  EXPECT_EQ(e.samples["h_seconds_bucket{le=\"0.5\"}"], kThreads * kPerThread);
}

TEST(MetricsTest, RemovedCollectorIsNotCalled) {
  MetricsRegistry registry;
  int calls = 0;
  int id = registry.AddCollector([&] {
    ++calls;
    return std::vector<MetricsRegistry::Sample>{{"x", "X.", "gauge", {}, 1}};
  });
  EXPECT_THAT(registry.Render(), HasSubstr("\nx 1\n"));
  registry.RemoveCollector(id);
  EXPECT_EQ(registry.Render(), "");
  EXPECT_EQ(calls, 1);
}

TEST(MetricsTest, DaemonMetricsRenderAsValidExposition) {
  Metrics().skips->Increment(2);
  Metrics().protection_seconds->Observe(0.02);
  Exposition e = Parse(GlobalMetrics().Render());
  EXPECT_EQ(e.samples["tessera_snapshot_skips_total"], 2);
  EXPECT_EQ(e.samples["tessera_protection_latency_seconds_count"], 1);
  EXPECT_EQ(e.samples["tessera_protection_latency_seconds_bucket{le=\"0.025\"}"], 1);
  EXPECT_EQ(e.types["tessera_restore_duration_seconds"], "histogram");
}

TEST(MetricsDeathTest, InvalidNameAborts) {
  MetricsRegistry registry;
  EXPECT_DEATH(registry.AddCounter("3bad", "B."), "invalid metric name '3bad'");
  registry.AddCounter("dual", "D.");
  EXPECT_DEATH(registry.AddGauge("dual", "D."), "dual is a counter, not a gauge");
}

}  // namespace
}  // namespace tessera
