// Reading a daemon's Prometheus /metrics page in tests.
#ifndef TESSERA_TESTS_METRICS_PAGE_H_
#define TESSERA_TESTS_METRICS_PAGE_H_

#include <map>
#include <string>

#include "absl/status/statusor.h"

namespace tessera::testing {

// The samples of http://127.0.0.1:<port>/metrics by "name{labels}" (comments left out).
// Errors: kUnavailable when the page cannot be fetched or is not 200, kInvalidArgument naming a
// line whose value does not parse.
absl::StatusOr<std::map<std::string, double>> ScrapeMetrics(int port);

// The sum of every sample of metric `name`, whatever its labels; -1 when it has none.
double SumOfMetric(const std::map<std::string, double>& samples, const std::string& name);

}  // namespace tessera::testing

#endif  // TESSERA_TESTS_METRICS_PAGE_H_
