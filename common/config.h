// Typed, table-driven configuration. Every key is declared once, in a ConfigSchema, with its
// type, default, one paragraph of documentation and an optional validator. Values come from a
// TOML file, then from "key=value" overrides (the last word wins); ConfigSchema::RenderDefaults()
// prints the whole schema as a commented TOML file that parses back to the defaults.
//
//   TESSERA_ASSIGN_OR_RETURN(ConfigSchema schema, ConfigSchema::Create({
//       ConfigKey::ByteSize("store.capacity_bytes", 0, "Shared memory this daemon may use..."),
//       ConfigKey::Int64("store.crc_threads", 4, "Threads that checksum...", InRange(1, 64)),
//   }));
//   TESSERA_ASSIGN_OR_RETURN(Config config, LoadConfig(schema, path, {"store.crc_threads=8"}));
//   int64_t threads = config.GetInt64("store.crc_threads");
//
// Key names are dotted paths of TOML bare keys ([A-Za-z0-9_-]+); everything before the last dot
// is the TOML table that holds the key ("store.capacity_bytes" is `capacity_bytes` in `[store]`).
//
// Errors in a file or an override are kInvalidArgument with one line per problem, each naming
// where ("path:line:column" or `override "k=v"`), the key, and what would be valid:
//   daemon.toml:3:18: store.capacity_bytes: expected a byte size such as 68719476736 or "64GiB",
//   got true
#ifndef TESSERA_COMMON_CONFIG_H_
#define TESSERA_COMMON_CONFIG_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace tessera {

enum class ConfigType { kBool, kInt64, kDouble, kString, kStringList, kByteSize };

// A value of any config type. kByteSize values are int64_t byte counts, never negative.
using ConfigValue = std::variant<bool, int64_t, double, std::string, std::vector<std::string>>;

// Checks a value beyond its type. `check` returns OK, or kInvalidArgument whose message says what
// is valid and what was given ("must be 1 to 64, got 0"); the loader prefixes where and which key.
// `description` says what is valid as a short phrase ("1 to 64") for RenderDefaults().
// A default-constructed validator (no `check`) accepts every value of the key's type.
struct ConfigValidator {
  std::string description;
  std::function<absl::Status(const ConfigValue&)> check;
};

// [min, max], for kInt64 and kByteSize keys.
ConfigValidator InRange(int64_t min, int64_t max);
// [min, max], for kDouble keys.
ConfigValidator DoubleInRange(double min, double max);
// One of `allowed`, for kString keys.
ConfigValidator OneOf(std::vector<std::string> allowed);
// A kString validator from a function of the string; `check` follows ConfigValidator's contract.
ConfigValidator StringValidator(std::string description,
                                std::function<absl::Status(const std::string&)> check);

// One key of a schema. Build with the factories, which set `type` to match the default.
struct ConfigKey {
  std::string name;  // "store.capacity_bytes"
  ConfigType type = ConfigType::kString;
  ConfigValue default_value;
  std::string doc;  // One paragraph, plain text; RenderDefaults() wraps it.
  ConfigValidator validator;

  static ConfigKey Bool(std::string name, bool default_value, std::string doc);
  static ConfigKey Int64(std::string name, int64_t default_value, std::string doc,
                         ConfigValidator validator = {});
  static ConfigKey Double(std::string name, double default_value, std::string doc,
                          ConfigValidator validator = {});
  static ConfigKey String(std::string name, std::string default_value, std::string doc,
                          ConfigValidator validator = {});
  static ConfigKey StringList(std::string name, std::vector<std::string> default_value,
                              std::string doc, ConfigValidator validator = {});
  static ConfigKey ByteSize(std::string name, int64_t default_bytes, std::string doc,
                            ConfigValidator validator = {});
};

// The declared keys of one component. Immutable once created; copyable; thread-safe.
class ConfigSchema {
 public:
  // Returns kInvalidArgument naming the key when a name is not a dotted path of bare keys, is
  // declared twice, or is also the table of another key ("store" and "store.directory"); when
  // the doc is empty; or when a default does not have the key's type or fails its validator.
  static absl::StatusOr<ConfigSchema> Create(std::vector<ConfigKey> keys);

  // In declaration order.
  const std::vector<ConfigKey>& keys() const { return keys_; }

  // The key named `name`, or nullptr.
  const ConfigKey* Find(std::string_view name) const;

  // The whole schema as a TOML file: keys grouped by table (top-level keys first, then tables in
  // order of first declaration), each preceded by its doc and type as `#` comments and set to
  // its default. Loading the result yields the defaults.
  std::string RenderDefaults() const;

 private:
  ConfigSchema() = default;

  std::vector<ConfigKey> keys_;
  std::map<std::string, size_t, std::less<>> index_;  // name -> position in keys_
};

// The values of every key of a schema. Immutable once loaded; const methods are thread-safe.
//
// The getters REQUIRE that `name` is declared with the getter's type: a mismatch is a programming
// error, and the process aborts with a message naming the key (in every build mode).
class Config {
 public:
  // Every key at its default.
  explicit Config(ConfigSchema schema);

  bool GetBool(std::string_view name) const;
  int64_t GetInt64(std::string_view name) const;
  double GetDouble(std::string_view name) const;
  const std::string& GetString(std::string_view name) const;
  const std::vector<std::string>& GetStringList(std::string_view name) const;
  int64_t GetByteSize(std::string_view name) const;

  const ConfigSchema& schema() const { return schema_; }

  // The current values in RenderDefaults()'s layout (docs included): a file that loads back to
  // this Config. Useful to log the effective configuration at start.
  std::string Render() const;

 private:
  friend absl::StatusOr<Config> LoadConfigFromString(const ConfigSchema& schema,
                                                     std::string_view toml,
                                                     std::string_view source_name,
                                                     const std::vector<std::string>& overrides);

  const ConfigValue& Get(std::string_view name, ConfigType type) const;

  ConfigSchema schema_;
  std::vector<ConfigValue> values_;  // parallel to schema_.keys()
};

// Loads the TOML file at `path` (none when empty), then applies `overrides` in order. Each
// override is "key=value"; the value is read per the key's type: a TOML value (`true`, `30_000`,
// `"quoted"`, `["a", "b"]`), or, for strings, string lists and byte sizes, bare text (`info`,
// `a,b,c` for a list, `64GiB`).
// Errors: kNotFound / kPermissionDenied / ... when the file cannot be read (the message names
// it); kInvalidArgument listing every problem in the file and the overrides, one per line: a
// TOML syntax error (with line and column), an unknown key (with the closest known key when one
// is near), a value of the wrong type or failing its validator, an override without '='.
absl::StatusOr<Config> LoadConfig(const ConfigSchema& schema, const std::string& path,
                                  const std::vector<std::string>& overrides);

// As LoadConfig, with the TOML text given; `source_name` stands for the path in messages.
absl::StatusOr<Config> LoadConfigFromString(const ConfigSchema& schema, std::string_view toml,
                                            std::string_view source_name,
                                            const std::vector<std::string>& overrides);

// Parses a byte size: a non-negative integer number of bytes ("4096"), optionally followed by a
// unit, case-insensitive, with optional space between: SI (KB, MB, GB, TB, PB: powers of 1000),
// IEC (KiB, MiB, GiB, TiB, PiB: powers of 1024) or B. With a unit of KB or larger the number may
// have a fraction ("1.5TB"); the result is rounded down to a whole byte.
// Errors: kInvalidArgument saying why (negative, unknown unit, not a number, above INT64_MAX).
absl::StatusOr<int64_t> ParseByteSize(std::string_view text);

// `bytes` in the largest IEC unit that divides it exactly ("64GiB"), or as a plain integer
// ("1000", "0"). ParseByteSize(FormatByteSize(n)) == n for every n >= 0.
std::string FormatByteSize(int64_t bytes);

}  // namespace tessera

#endif  // TESSERA_COMMON_CONFIG_H_
