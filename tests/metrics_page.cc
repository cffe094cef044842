#include "tests/metrics_page.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "httplib.h"

namespace tessera::testing {

absl::StatusOr<std::map<std::string, double>> ScrapeMetrics(int port) {
  httplib::Client client("127.0.0.1", port);
  client.set_connection_timeout(5, 0);
  client.set_read_timeout(10, 0);
  auto res = client.Get("/metrics");
  if (!res) return absl::UnavailableError(absl::StrCat("GET /metrics on port ", port, " failed"));
  if (res->status != 200) {
    return absl::UnavailableError(
        absl::StrCat("GET /metrics on port ", port, " answered ", res->status));
  }
  std::map<std::string, double> samples;
  for (absl::string_view line : absl::StrSplit(res->body, '\n', absl::SkipEmpty())) {
    if (line[0] == '#') continue;
    const size_t space = line.rfind(' ');
    double value = 0;
    if (space == absl::string_view::npos || !absl::SimpleAtod(line.substr(space + 1), &value)) {
      return absl::InvalidArgumentError(absl::StrCat("port ", port, ": bad sample: ", line));
    }
    samples[std::string(line.substr(0, space))] = value;
  }
  return samples;
}

double SumOfMetric(const std::map<std::string, double>& samples, const std::string& name) {
  double sum = 0;
  bool found = false;
  for (auto it = samples.lower_bound(name); it != samples.end(); ++it) {
    const std::string& key = it->first;
    if (key.compare(0, name.size(), name) != 0) break;
    if (key.size() != name.size() && key[name.size()] != '{') continue;
    sum += it->second;
    found = true;
  }
  return found ? sum : -1;
}

}  // namespace tessera::testing
