// Human-readable output for the CLI: sizes, durations and aligned tables.
#ifndef TESSERA_CLI_FORMAT_H_
#define TESSERA_CLI_FORMAT_H_

#include <cstdint>
#include <string>
#include <vector>

namespace tessera::cli {

// 1536 -> "1.5 KiB", 0 -> "0 B".
std::string HumanBytes(uint64_t bytes);
// 0.0123 s -> "12.3 ms", 75 s -> "1m15s".
std::string HumanSeconds(double seconds);
// A probability: "0.25", "3.1e-07", "0" for zero.
std::string HumanProbability(double p);
// 0x-prefixed 8 hex digits.
std::string HexCrc(uint32_t crc);

// Rows of cells printed with columns aligned (two spaces apart), indented by `indent`.
class Table {
 public:
  explicit Table(std::vector<std::string> header, int indent = 2)
      : header_(std::move(header)), indent_(indent) {}
  void AddRow(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  bool empty() const { return rows_.empty(); }
  std::string Render() const;

 private:
  std::vector<std::string> header_;
  std::vector<std::vector<std::string>> rows_;
  int indent_;
};

}  // namespace tessera::cli

#endif  // TESSERA_CLI_FORMAT_H_
