#include "cli/format.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace tessera::cli {

std::string HumanBytes(uint64_t bytes) {
  static const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  if (bytes < 1024) return absl::StrCat(bytes, " B");
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024 && unit < 5) {
    value /= 1024;
    ++unit;
  }
  return absl::StrFormat(value < 10    ? "%.2f %s"
                         : value < 100 ? "%.1f %s"
                                       : "%.0f %s",
                         value, kUnits[unit]);
}

std::string HumanSeconds(double seconds) {
  if (seconds < 0) return "-";
  if (seconds < 1e-3) return absl::StrFormat("%.0f us", seconds * 1e6);
  if (seconds < 1) return absl::StrFormat("%.1f ms", seconds * 1e3);
  if (seconds < 60) return absl::StrFormat("%.2f s", seconds);
  const int64_t whole = static_cast<int64_t>(seconds);
  if (whole < 3600) return absl::StrFormat("%dm%02ds", whole / 60, whole % 60);
  if (whole < 86400 * 2) return absl::StrFormat("%dh%02dm", whole / 3600, whole % 3600 / 60);
  if (seconds < 86400 * 3650) return absl::StrFormat("%.1f days", seconds / 86400);
  return absl::StrFormat("%.3g years", seconds / (86400 * 365.25));
}

std::string HumanProbability(double p) {
  if (p == 0) return "0";
  if (p >= 0.001) return absl::StrFormat("%.4f", p);
  return absl::StrFormat("%.2e", p);
}

std::string HexCrc(uint32_t crc) { return absl::StrFormat("0x%08x", crc); }

std::string Table::Render() const {
  std::vector<size_t> widths(header_.size(), 0);
  auto measure = [&](const std::vector<std::string>& row) {
    for (size_t i = 0; i < row.size() && i < widths.size(); ++i) {
      widths[i] = std::max(widths[i], row[i].size());
    }
  };
  measure(header_);
  for (const auto& row : rows_) measure(row);
  std::string out;
  auto render = [&](const std::vector<std::string>& row) {
    std::string line(indent_, ' ');
    for (size_t i = 0; i < row.size() && i < widths.size(); ++i) {
      line += row[i];
      if (i + 1 < row.size()) line += std::string(widths[i] - row[i].size() + 2, ' ');
    }
    out += line + "\n";
  };
  render(header_);
  for (const auto& row : rows_) render(row);
  return out;
}

}  // namespace tessera::cli
