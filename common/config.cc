#include "common/config.h"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <tuple>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/json.h"
#include "common/status.h"
#include "toml++/toml.h"

namespace tessera {
namespace {

constexpr size_t kRenderWidth = 100;
constexpr char kByteSizeExpectation[] = "a byte size such as 68719476736 or \"64GiB\"";
constexpr char kByteSizeUnits[] = "B, KB, MB, GB, TB, PB, KiB, MiB, GiB, TiB, PiB";

// ---------------------------------------------------------------------------------------------
// Small helpers.

absl::string_view ToAbsl(std::string_view s) { return absl::string_view(s.data(), s.size()); }
std::string_view ToStd(absl::string_view s) { return std::string_view(s.data(), s.size()); }

bool IsBareKey(absl::string_view s) {
  if (s.empty()) return false;
  for (char c : s) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '_' && c != '-') return false;
  }
  return true;
}

// "store.capacity_bytes" -> "store"; "top" -> "".
absl::string_view TableOf(absl::string_view name) {
  size_t dot = name.rfind('.');
  return dot == absl::string_view::npos ? absl::string_view() : name.substr(0, dot);
}

absl::string_view LeafOf(absl::string_view name) {
  size_t dot = name.rfind('.');
  return dot == absl::string_view::npos ? name : name.substr(dot + 1);
}

size_t EditDistance(absl::string_view a, absl::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

// JSON's string escapes are TOML's.
std::string QuoteToml(absl::string_view s) { return JsonQuote({s.data(), s.size()}); }

// Shortest text that reads back as exactly `d`, always recognisable as a TOML float.
std::string FormatDouble(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), d);
  std::string s(buf, ec == std::errc() ? end : buf);
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  return s;
}

std::string FormatInt(int64_t v) { return std::to_string(v); }

[[noreturn]] void ConfigMisuse(const std::string& message) {
  std::fprintf(stderr, "tessera config: %s\n", message.c_str());
  std::abort();
}

const char* TypeName(ConfigType type) {
  switch (type) {
    case ConfigType::kBool:
      return "bool";
    case ConfigType::kInt64:
      return "int64";
    case ConfigType::kDouble:
      return "double";
    case ConfigType::kString:
      return "string";
    case ConfigType::kStringList:
      return "string list";
    case ConfigType::kByteSize:
      return "byte size";
  }
  return "?";
}

// What a value of `type` looks like, for "expected ..." messages.
std::string Expectation(ConfigType type) {
  switch (type) {
    case ConfigType::kBool:
      return "true or false";
    case ConfigType::kInt64:
      return "an integer";
    case ConfigType::kDouble:
      return "a number";
    case ConfigType::kString:
      return "a string";
    case ConfigType::kStringList:
      return "a list of strings such as [\"a\", \"b\"]";
    case ConfigType::kByteSize:
      return kByteSizeExpectation;
  }
  return "?";
}

// The type as described in RenderDefaults()'s comments.
std::string RenderedTypeName(ConfigType type) {
  switch (type) {
    case ConfigType::kBool:
      return "true or false";
    case ConfigType::kInt64:
      return "integer";
    case ConfigType::kDouble:
      return "number";
    case ConfigType::kString:
      return "string";
    case ConfigType::kStringList:
      return "list of strings";
    case ConfigType::kByteSize:
      return absl::StrCat("byte size: a number of bytes, or a string with a unit (", kByteSizeUnits,
                          ") such as \"64GiB\" or \"1.5TB\"");
  }
  return "?";
}

bool HoldsType(const ConfigValue& value, ConfigType type) {
  switch (type) {
    case ConfigType::kBool:
      return std::holds_alternative<bool>(value);
    case ConfigType::kInt64:
    case ConfigType::kByteSize:
      return std::holds_alternative<int64_t>(value);
    case ConfigType::kDouble:
      return std::holds_alternative<double>(value);
    case ConfigType::kString:
      return std::holds_alternative<std::string>(value);
    case ConfigType::kStringList:
      return std::holds_alternative<std::vector<std::string>>(value);
  }
  return false;
}

// `value` as TOML text.
std::string RenderValue(const ConfigValue& value, ConfigType type) {
  switch (type) {
    case ConfigType::kBool:
      return std::get<bool>(value) ? "true" : "false";
    case ConfigType::kInt64:
      return FormatInt(std::get<int64_t>(value));
    case ConfigType::kDouble:
      return FormatDouble(std::get<double>(value));
    case ConfigType::kString:
      return QuoteToml(std::get<std::string>(value));
    case ConfigType::kStringList: {
      std::vector<std::string> quoted;
      for (const std::string& s : std::get<std::vector<std::string>>(value)) {
        quoted.push_back(QuoteToml(s));
      }
      return absl::StrCat("[", absl::StrJoin(quoted, ", "), "]");
    }
    case ConfigType::kByteSize: {
      std::string text = FormatByteSize(std::get<int64_t>(value));
      bool digits_only =
          std::all_of(text.begin(), text.end(), [](char c) { return absl::ascii_isdigit(c); });
      return digits_only ? text : QuoteToml(text);
    }
  }
  return "";
}

// A TOML node as its author wrote it, roughly, for "got ..." in messages.
std::string DescribeNode(const toml::node& node) {
  if (auto* v = node.as_boolean()) return v->get() ? "true" : "false";
  if (auto* v = node.as_integer()) return FormatInt(v->get());
  if (auto* v = node.as_floating_point()) return FormatDouble(v->get());
  if (auto* v = node.as_string()) return QuoteToml(v->get());
  if (auto* v = node.as_array()) {
    std::vector<std::string> items;
    for (const toml::node& item : *v) items.push_back(DescribeNode(item));
    std::string text = absl::StrCat("[", absl::StrJoin(items, ", "), "]");
    if (text.size() > 60) text = absl::StrCat(text.substr(0, 56), " ...]");
    return text;
  }
  if (node.is_table()) return "a table";
  if (node.is_date()) return "a date";
  if (node.is_time()) return "a time";
  if (node.is_date_time()) return "a date-time";
  return "a value of another type";
}

// ---------------------------------------------------------------------------------------------
// Byte sizes.

struct ByteUnit {
  const char* name;
  int64_t multiplier;
};

constexpr int64_t kKiB = int64_t{1} << 10;
constexpr ByteUnit kByteUnits[] = {
    {"B", 1},
    {"KB", 1000},
    {"MB", 1000 * 1000},
    {"GB", int64_t{1000} * 1000 * 1000},
    {"TB", int64_t{1000} * 1000 * 1000 * 1000},
    {"PB", int64_t{1000} * 1000 * 1000 * 1000 * 1000},
    {"KiB", kKiB},
    {"MiB", kKiB << 10},
    {"GiB", kKiB << 20},
    {"TiB", kKiB << 30},
    {"PiB", kKiB << 40},
};

// On failure returns false and sets *reason to why `text` is not a byte size.
bool ParseByteSizeText(absl::string_view text, int64_t* bytes, std::string* reason) {
  absl::string_view s = absl::StripAsciiWhitespace(text);
  if (s.empty()) {
    *reason = "it is empty";
    return false;
  }
  if (s[0] == '-') {
    *reason = "a size cannot be negative";
    return false;
  }
  size_t i = 0;
  while (i < s.size() && absl::ascii_isdigit(s[i])) ++i;
  absl::string_view whole_digits = s.substr(0, i);
  absl::string_view fraction_digits;
  if (i < s.size() && s[i] == '.') {
    size_t start = ++i;
    while (i < s.size() && absl::ascii_isdigit(s[i])) ++i;
    fraction_digits = s.substr(start, i - start);
  }
  if (whole_digits.empty() && fraction_digits.empty()) {
    *reason = absl::StrCat("expected a number of bytes followed by an optional unit (",
                           kByteSizeUnits, ")");
    return false;
  }
  absl::string_view unit_text = absl::StripLeadingAsciiWhitespace(s.substr(i));
  int64_t multiplier = 1;
  if (!unit_text.empty()) {
    const ByteUnit* found = nullptr;
    for (const ByteUnit& unit : kByteUnits) {
      if (absl::EqualsIgnoreCase(unit_text, unit.name)) found = &unit;
    }
    if (found == nullptr) {
      *reason = absl::StrCat("unknown unit \"", unit_text, "\"; the units are ", kByteSizeUnits);
      return false;
    }
    multiplier = found->multiplier;
  }
  if (s.find('.') != absl::string_view::npos && multiplier < 1000) {
    *reason = "a fraction needs a unit of KB or larger";
    return false;
  }
  constexpr uint64_t kMax = static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  const std::string too_large = absl::StrCat("it is more than ", kMax, " bytes");
  // Exact arithmetic: whole * multiplier + fraction * multiplier / 10^digits, rounded down.
  unsigned __int128 whole = 0;
  for (char c : whole_digits) {
    whole = whole * 10 + static_cast<unsigned>(c - '0');
    if (whole > kMax) {
      *reason = too_large;
      return false;
    }
  }
  unsigned __int128 total = whole * static_cast<unsigned __int128>(multiplier);
  if (!fraction_digits.empty()) {
    // Digits beyond the 18th are below 1e-18 of a unit (at most 1e-18 * 2^50 bytes): drop them.
    absl::string_view digits = fraction_digits.substr(0, 18);
    unsigned __int128 numerator = 0;
    unsigned __int128 denominator = 1;
    for (char c : digits) {
      numerator = numerator * 10 + static_cast<unsigned>(c - '0');
      denominator *= 10;
    }
    total += numerator * static_cast<unsigned __int128>(multiplier) / denominator;
  }
  if (total > kMax) {
    *reason = too_large;
    return false;
  }
  *bytes = static_cast<int64_t>(total);
  return true;
}

// ---------------------------------------------------------------------------------------------
// Reading values.

// Where a problem is, for messages and for sorting them in file order.
struct Problem {
  uint32_t line = 0;  // 0 for overrides, which come after the file
  uint32_t column = 0;
  size_t sequence = 0;  // order of discovery, the tie-breaker
  std::string message;
};

// `node` as a value of `key`'s type, before validation. On failure, the message is
// "expected ..., got ..." (the caller adds where and which key).
absl::StatusOr<ConfigValue> ValueFromNode(const toml::node& node, const ConfigKey& key) {
  auto wrong_type = [&](const std::string& detail = "") {
    return absl::InvalidArgumentError(
        absl::StrCat("expected ", Expectation(key.type), ", got ", DescribeNode(node), detail));
  };
  switch (key.type) {
    case ConfigType::kBool:
      if (auto* v = node.as_boolean()) return ConfigValue(v->get());
      return wrong_type();
    case ConfigType::kInt64:
      if (auto* v = node.as_integer()) return ConfigValue(v->get());
      return wrong_type();
    case ConfigType::kDouble:
      if (auto* v = node.as_floating_point()) return ConfigValue(v->get());
      if (auto* v = node.as_integer()) return ConfigValue(static_cast<double>(v->get()));
      return wrong_type();
    case ConfigType::kString:
      if (auto* v = node.as_string()) return ConfigValue(v->get());
      return wrong_type();
    case ConfigType::kStringList: {
      auto* array = node.as_array();
      if (array == nullptr) return wrong_type();
      std::vector<std::string> list;
      for (const toml::node& item : *array) {
        auto* s = item.as_string();
        if (s == nullptr) return wrong_type();
        list.push_back(s->get());
      }
      return ConfigValue(std::move(list));
    }
    case ConfigType::kByteSize: {
      if (auto* v = node.as_integer()) {
        if (v->get() < 0) return wrong_type(" (a size cannot be negative)");
        return ConfigValue(v->get());
      }
      if (auto* v = node.as_string()) {
        int64_t bytes = 0;
        std::string reason;
        if (!ParseByteSizeText(v->get(), &bytes, &reason)) {
          return wrong_type(absl::StrCat(" (", reason, ")"));
        }
        return ConfigValue(bytes);
      }
      return wrong_type();
    }
  }
  return absl::InternalError("unknown config type");
}

absl::Status Validate(const ConfigKey& key, const ConfigValue& value) {
  if (!key.validator.check) return absl::OkStatus();
  return key.validator.check(value);
}

// The known key nearest to `name`, or "" when none is near enough to be a likely typo.
std::string ClosestKey(const ConfigSchema& schema, absl::string_view name) {
  const ConfigKey* best = nullptr;
  size_t best_distance = std::numeric_limits<size_t>::max();
  for (const ConfigKey& key : schema.keys()) {
    size_t distance = EditDistance(name, key.name);
    if (distance < best_distance) {
      best = &key;
      best_distance = distance;
    }
  }
  if (best == nullptr) return "";
  size_t longer = std::max(name.size(), best->name.size());
  if (best_distance <= std::max<size_t>(2, longer / 3)) return best->name;
  // The right key in the wrong table ("capacity_bytes" at top level, or under [stor]).
  for (const ConfigKey& key : schema.keys()) {
    if (LeafOf(key.name) == LeafOf(name)) return key.name;
  }
  return "";
}

std::string UnknownKeyMessage(const ConfigSchema& schema, absl::string_view name) {
  std::string message = absl::StrCat("unknown key \"", name, "\"");
  std::string closest = ClosestKey(schema, name);
  if (!closest.empty()) absl::StrAppend(&message, " (did you mean \"", closest, "\"?)");
  return message;
}

// True if `name` is the table of some key ("store" for "store.directory").
bool IsTable(const ConfigSchema& schema, absl::string_view name) {
  for (const ConfigKey& key : schema.keys()) {
    if (key.name.size() > name.size() && absl::StartsWith(key.name, name) &&
        key.name[name.size()] == '.') {
      return true;
    }
  }
  return false;
}

// Loads values from a parsed file into `values`; reports problems in `problems`.
class FileReader {
 public:
  FileReader(const ConfigSchema& schema, absl::string_view source_name,
             std::vector<ConfigValue>* values, std::vector<Problem>* problems)
      : schema_(schema), source_name_(source_name), values_(values), problems_(problems) {}

  void ReadTable(const toml::table& table, const std::string& prefix) {
    for (auto&& [toml_key, node] : table) {
      absl::string_view component = ToAbsl(toml_key.str());
      std::string name =
          prefix.empty() ? std::string(component) : absl::StrCat(prefix, ".", component);
      const ConfigKey* key = IsBareKey(component) ? schema_.Find(ToStd(name)) : nullptr;
      if (key != nullptr) {
        ReadValue(node, *key);
      } else if (node.is_table() && IsBareKey(component) &&
                 (IsTable(schema_, name) || !node.as_table()->empty())) {
        // A known table, or an unknown one whose keys are reported one by one (each with a
        // suggestion: "stor.directory" -> "store.directory").
        ReadTable(*node.as_table(), name);
      } else if (IsTable(schema_, name)) {
        Report(node.source(), absl::StrCat(name, ": expected a table of keys such as \"",
                                           FirstKeyIn(name), "\", got ", DescribeNode(node)));
      } else {
        Report(toml_key.source(), UnknownKeyMessage(schema_, name));
      }
    }
  }

 private:
  void ReadValue(const toml::node& node, const ConfigKey& key) {
    absl::StatusOr<ConfigValue> value = ValueFromNode(node, key);
    absl::Status valid = value.ok() ? Validate(key, *value) : value.status();
    if (!valid.ok()) {
      Report(node.source(), absl::StrCat(key.name, ": ", valid.message()));
      return;
    }
    size_t index = static_cast<size_t>(&key - schema_.keys().data());
    (*values_)[index] = *std::move(value);
  }

  std::string FirstKeyIn(absl::string_view table) const {
    for (const ConfigKey& key : schema_.keys()) {
      if (absl::StartsWith(key.name, absl::StrCat(table, "."))) return key.name;
    }
    return "";
  }

  void Report(const toml::source_region& where, std::string message) {
    Problem problem;
    problem.line = where.begin.line;
    problem.column = where.begin.column;
    problem.sequence = problems_->size();
    problem.message =
        absl::StrCat(source_name_, ":", where.begin.line, ":", where.begin.column, ": ", message);
    problems_->push_back(std::move(problem));
  }

  const ConfigSchema& schema_;
  absl::string_view source_name_;
  std::vector<ConfigValue>* values_;
  std::vector<Problem>* problems_;
};

// Parses `text` as a single TOML value; false if it is not one.
bool ParseTomlValue(absl::string_view text, toml::table* holder) {
  try {
    toml::table table = toml::parse(absl::StrCat("v = ", text));
    if (table.size() != 1 || !table.contains("v")) return false;
    *holder = std::move(table);
    return true;
  } catch (const toml::parse_error&) {
    return false;
  }
}

// Reads the value of an override for `key`. On failure, the message is "expected ..., got ...".
absl::StatusOr<ConfigValue> ValueFromOverride(absl::string_view text, const ConfigKey& key) {
  auto wrong_type = [&](absl::string_view detail = "") {
    return absl::InvalidArgumentError(absl::StrCat("expected ", Expectation(key.type), ", got ",
                                                   text.empty() ? "an empty value" : text, detail));
  };
  toml::table holder;
  bool is_toml = ParseTomlValue(text, &holder);
  switch (key.type) {
    case ConfigType::kBool:
    case ConfigType::kInt64:
    case ConfigType::kDouble:
      if (!is_toml) return wrong_type();
      return ValueFromNode(*holder.get("v"), key);
    case ConfigType::kString:
      if (!text.empty() && (text[0] == '"' || text[0] == '\'')) {
        if (!is_toml) return wrong_type(" (a quoted value must be a valid TOML string)");
        return ValueFromNode(*holder.get("v"), key);
      }
      return ConfigValue(std::string(text));
    case ConfigType::kStringList: {
      if (!text.empty() && text[0] == '[') {
        if (!is_toml) return wrong_type(" (not a valid TOML array)");
        return ValueFromNode(*holder.get("v"), key);
      }
      std::vector<std::string> list;
      if (text.empty()) return ConfigValue(list);
      for (absl::string_view item : absl::StrSplit(text, ',')) {
        item = absl::StripAsciiWhitespace(item);
        if (item.empty()) return wrong_type(" (an empty item in a comma-separated list)");
        list.emplace_back(item);
      }
      return ConfigValue(std::move(list));
    }
    case ConfigType::kByteSize: {
      if (is_toml) return ValueFromNode(*holder.get("v"), key);
      toml::value<std::string> bare{std::string(text)};
      return ValueFromNode(bare, key);
    }
  }
  return absl::InternalError("unknown config type");
}

// "key=value" for the first key whose default is not empty, as an example in messages.
std::string ExampleOverride(const ConfigSchema& schema) {
  for (const ConfigKey& key : schema.keys()) {
    std::string value = key.type == ConfigType::kString ? std::get<std::string>(key.default_value)
                                                        : RenderValue(key.default_value, key.type);
    if (!value.empty() && value != "[]") return absl::StrCat(key.name, "=", value);
  }
  return "key=value";
}

void ApplyOverride(const ConfigSchema& schema, const std::string& text,
                   std::vector<ConfigValue>* values, std::vector<Problem>* problems) {
  auto report = [&](const std::string& message) {
    Problem problem;
    problem.line = std::numeric_limits<uint32_t>::max();
    problem.sequence = problems->size();
    problem.message = absl::StrCat("override \"", text, "\": ", message);
    problems->push_back(std::move(problem));
  };
  size_t eq = text.find('=');
  absl::string_view name = eq == std::string::npos
                               ? ""
                               : absl::StripAsciiWhitespace(absl::string_view(text).substr(0, eq));
  if (name.empty()) {
    report(absl::StrCat("expected key=value, such as ", ExampleOverride(schema)));
    return;
  }
  const ConfigKey* key = schema.Find(ToStd(name));
  if (key == nullptr) {
    report(UnknownKeyMessage(schema, name));
    return;
  }
  absl::string_view value_text = absl::StripAsciiWhitespace(absl::string_view(text).substr(eq + 1));
  absl::StatusOr<ConfigValue> value = ValueFromOverride(value_text, *key);
  absl::Status valid = value.ok() ? Validate(*key, *value) : value.status();
  if (!valid.ok()) {
    report(absl::StrCat(key->name, ": ", valid.message()));
    return;
  }
  (*values)[static_cast<size_t>(key - schema.keys().data())] = *std::move(value);
}

// Appends `doc` to `out` as `#` comment lines of at most kRenderWidth columns.
void AppendWrappedComment(absl::string_view doc, std::string* out) {
  std::string line = "#";
  for (absl::string_view word : absl::StrSplit(doc, absl::ByAnyChar(" \n\t"), absl::SkipEmpty())) {
    if (line.size() > 1 && line.size() + 1 + word.size() > kRenderWidth) {
      absl::StrAppend(out, line, "\n");
      line = "#";
    }
    absl::StrAppend(&line, " ", word);
  }
  if (line.size() > 1) absl::StrAppend(out, line, "\n");
}

std::string RenderToml(const ConfigSchema& schema, const std::vector<ConfigValue>& values) {
  // Tables in order of first declaration, top-level keys ("" table) first.
  std::vector<absl::string_view> tables;
  bool has_top_level = false;
  for (const ConfigKey& key : schema.keys()) {
    absl::string_view table = TableOf(key.name);
    if (table.empty()) {
      has_top_level = true;
    } else if (std::find(tables.begin(), tables.end(), table) == tables.end()) {
      tables.push_back(table);
    }
  }
  if (has_top_level) tables.insert(tables.begin(), absl::string_view());

  std::string out;
  for (absl::string_view table : tables) {
    if (!table.empty()) absl::StrAppend(&out, out.empty() ? "" : "\n", "[", table, "]\n");
    for (size_t i = 0; i < schema.keys().size(); ++i) {
      const ConfigKey& key = schema.keys()[i];
      if (TableOf(key.name) != table) continue;
      out += "\n";
      AppendWrappedComment(key.doc, &out);
      std::string type_line = absl::StrCat("Type: ", RenderedTypeName(key.type));
      if (!key.validator.description.empty()) {
        absl::StrAppend(&type_line, "; valid: ", key.validator.description);
      }
      AppendWrappedComment(type_line, &out);
      absl::StrAppend(&out, LeafOf(key.name), " = ", RenderValue(values[i], key.type), "\n");
    }
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Validators and keys.

ConfigValidator InRange(int64_t min, int64_t max) {
  ConfigValidator v;
  v.description = absl::StrCat(min, " to ", max);
  v.check = [min, max](const ConfigValue& value) -> absl::Status {
    const int64_t* n = std::get_if<int64_t>(&value);
    if (n == nullptr) return absl::InvalidArgumentError("InRange applies to integers only");
    if (*n < min || *n > max) {
      return absl::InvalidArgumentError(absl::StrCat("must be ", min, " to ", max, ", got ", *n));
    }
    return absl::OkStatus();
  };
  return v;
}

ConfigValidator DoubleInRange(double min, double max) {
  ConfigValidator v;
  v.description = absl::StrCat(FormatDouble(min), " to ", FormatDouble(max));
  v.check = [min, max](const ConfigValue& value) -> absl::Status {
    const double* d = std::get_if<double>(&value);
    if (d == nullptr) return absl::InvalidArgumentError("DoubleInRange applies to numbers only");
    if (!(*d >= min && *d <= max)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "must be ", FormatDouble(min), " to ", FormatDouble(max), ", got ", FormatDouble(*d)));
    }
    return absl::OkStatus();
  };
  return v;
}

ConfigValidator OneOf(std::vector<std::string> allowed) {
  ConfigValidator v;
  v.description = absl::StrCat("one of ", absl::StrJoin(allowed, ", "));
  v.check = [allowed = std::move(allowed)](const ConfigValue& value) -> absl::Status {
    const std::string* s = std::get_if<std::string>(&value);
    if (s == nullptr) return absl::InvalidArgumentError("OneOf applies to strings only");
    if (std::find(allowed.begin(), allowed.end(), *s) == allowed.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("must be one of ", absl::StrJoin(allowed, ", "), "; got ", QuoteToml(*s)));
    }
    return absl::OkStatus();
  };
  return v;
}

ConfigValidator StringValidator(std::string description,
                                std::function<absl::Status(const std::string&)> check) {
  ConfigValidator v;
  v.description = std::move(description);
  v.check = [check = std::move(check)](const ConfigValue& value) -> absl::Status {
    const std::string* s = std::get_if<std::string>(&value);
    if (s == nullptr) return absl::InvalidArgumentError("StringValidator applies to strings only");
    return check(*s);
  };
  return v;
}

namespace {

ConfigKey MakeKey(std::string name, ConfigType type, ConfigValue default_value, std::string doc,
                  ConfigValidator validator) {
  ConfigKey key;
  key.name = std::move(name);
  key.type = type;
  key.default_value = std::move(default_value);
  key.doc = std::move(doc);
  key.validator = std::move(validator);
  return key;
}

}  // namespace

ConfigKey ConfigKey::Bool(std::string name, bool default_value, std::string doc) {
  return MakeKey(std::move(name), ConfigType::kBool, default_value, std::move(doc), {});
}

ConfigKey ConfigKey::Int64(std::string name, int64_t default_value, std::string doc,
                           ConfigValidator validator) {
  return MakeKey(std::move(name), ConfigType::kInt64, default_value, std::move(doc),
                 std::move(validator));
}

ConfigKey ConfigKey::Double(std::string name, double default_value, std::string doc,
                            ConfigValidator validator) {
  return MakeKey(std::move(name), ConfigType::kDouble, default_value, std::move(doc),
                 std::move(validator));
}

ConfigKey ConfigKey::String(std::string name, std::string default_value, std::string doc,
                            ConfigValidator validator) {
  return MakeKey(std::move(name), ConfigType::kString, std::move(default_value), std::move(doc),
                 std::move(validator));
}

ConfigKey ConfigKey::StringList(std::string name, std::vector<std::string> default_value,
                                std::string doc, ConfigValidator validator) {
  return MakeKey(std::move(name), ConfigType::kStringList, std::move(default_value), std::move(doc),
                 std::move(validator));
}

ConfigKey ConfigKey::ByteSize(std::string name, int64_t default_bytes, std::string doc,
                              ConfigValidator validator) {
  return MakeKey(std::move(name), ConfigType::kByteSize, default_bytes, std::move(doc),
                 std::move(validator));
}

// ---------------------------------------------------------------------------------------------
// ConfigSchema.

absl::StatusOr<ConfigSchema> ConfigSchema::Create(std::vector<ConfigKey> keys) {
  ConfigSchema schema;
  for (size_t i = 0; i < keys.size(); ++i) {
    const ConfigKey& key = keys[i];
    auto invalid = [&](absl::string_view why) {
      return absl::InvalidArgumentError(
          absl::StrCat("config schema: key \"", key.name, "\": ", why));
    };
    for (absl::string_view component : absl::StrSplit(key.name, '.')) {
      if (!IsBareKey(component)) {
        return invalid("a name is dot-separated parts of A-Z a-z 0-9 _ -");
      }
    }
    if (!schema.index_.emplace(key.name, i).second) return invalid("declared twice");
    if (key.doc.empty()) return invalid("has no doc");
    if (!HoldsType(key.default_value, key.type)) {
      return invalid(absl::StrCat("the default does not have type ", TypeName(key.type)));
    }
    if (key.type == ConfigType::kByteSize && std::get<int64_t>(key.default_value) < 0) {
      return invalid("a byte size default cannot be negative");
    }
    absl::Status valid = Validate(key, key.default_value);
    if (!valid.ok())
      return invalid(absl::StrCat("the default fails its validator: ", valid.message()));
  }
  for (const ConfigKey& key : keys) {
    for (absl::string_view table = TableOf(key.name); !table.empty(); table = TableOf(table)) {
      auto it = schema.index_.find(ToStd(table));
      if (it != schema.index_.end()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "config schema: key \"", table, "\" is also the table of key \"", key.name, "\""));
      }
    }
  }
  schema.keys_ = std::move(keys);
  return schema;
}

const ConfigKey* ConfigSchema::Find(std::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &keys_[it->second];
}

std::string ConfigSchema::RenderDefaults() const {
  std::vector<ConfigValue> defaults;
  for (const ConfigKey& key : keys_) defaults.push_back(key.default_value);
  return RenderToml(*this, defaults);
}

// ---------------------------------------------------------------------------------------------
// Config.

Config::Config(ConfigSchema schema) : schema_(std::move(schema)) {
  for (const ConfigKey& key : schema_.keys()) values_.push_back(key.default_value);
}

const ConfigValue& Config::Get(std::string_view name, ConfigType type) const {
  const ConfigKey* key = schema_.Find(name);
  if (key == nullptr) ConfigMisuse(absl::StrCat("no key \"", ToAbsl(name), "\" in the schema"));
  if (key->type != type) {
    ConfigMisuse(absl::StrCat("key \"", ToAbsl(name), "\" has type ", TypeName(key->type),
                              ", read as ", TypeName(type)));
  }
  return values_[static_cast<size_t>(key - schema_.keys().data())];
}

bool Config::GetBool(std::string_view name) const {
  return std::get<bool>(Get(name, ConfigType::kBool));
}

int64_t Config::GetInt64(std::string_view name) const {
  return std::get<int64_t>(Get(name, ConfigType::kInt64));
}

double Config::GetDouble(std::string_view name) const {
  return std::get<double>(Get(name, ConfigType::kDouble));
}

const std::string& Config::GetString(std::string_view name) const {
  return std::get<std::string>(Get(name, ConfigType::kString));
}

const std::vector<std::string>& Config::GetStringList(std::string_view name) const {
  return std::get<std::vector<std::string>>(Get(name, ConfigType::kStringList));
}

int64_t Config::GetByteSize(std::string_view name) const {
  return std::get<int64_t>(Get(name, ConfigType::kByteSize));
}

std::string Config::Render() const { return RenderToml(schema_, values_); }

// ---------------------------------------------------------------------------------------------
// Loading.

absl::StatusOr<Config> LoadConfigFromString(const ConfigSchema& schema, std::string_view toml,
                                            std::string_view source_name_std,
                                            const std::vector<std::string>& overrides) {
  absl::string_view source_name = ToAbsl(source_name_std);
  Config config(schema);
  std::vector<Problem> problems;
  toml::table table;
  try {
    table = toml::parse(toml, source_name_std);
  } catch (const toml::parse_error& e) {
    // Syntax errors stop the file, not the overrides: report both.
    Problem problem;
    problem.line = e.source().begin.line;
    problem.column = e.source().begin.column;
    problem.message =
        absl::StrCat(source_name, ":", e.source().begin.line, ":", e.source().begin.column,
                     ": TOML syntax error: ", ToAbsl(e.description()));
    problems.push_back(std::move(problem));
    table = toml::table();
  }
  FileReader(schema, source_name, &config.values_, &problems).ReadTable(table, "");
  for (const std::string& override_text : overrides) {
    ApplyOverride(schema, override_text, &config.values_, &problems);
  }
  if (problems.empty()) return config;
  std::stable_sort(problems.begin(), problems.end(), [](const Problem& a, const Problem& b) {
    return std::tie(a.line, a.column, a.sequence) < std::tie(b.line, b.column, b.sequence);
  });
  std::vector<std::string> messages;
  for (const Problem& problem : problems) messages.push_back(problem.message);
  return absl::InvalidArgumentError(absl::StrJoin(messages, "\n"));
}

absl::StatusOr<Config> LoadConfig(const ConfigSchema& schema, const std::string& path,
                                  const std::vector<std::string>& overrides) {
  if (path.empty()) return LoadConfigFromString(schema, "", "(no file)", overrides);
  std::FILE* file = std::fopen(path.c_str(), "rb");
  if (file == nullptr) return ErrnoStatus(errno, absl::StrCat("cannot open config file ", path));
  std::string text;
  char buffer[1 << 14];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), file)) > 0) text.append(buffer, n);
  int read_error = std::ferror(file) ? errno : 0;
  std::fclose(file);
  if (read_error != 0) {
    return ErrnoStatus(read_error, absl::StrCat("cannot read config file ", path));
  }
  return LoadConfigFromString(schema, text, path, overrides);
}

absl::StatusOr<int64_t> ParseByteSize(std::string_view text_std) {
  absl::string_view text = ToAbsl(text_std);
  int64_t bytes = 0;
  std::string reason;
  if (!ParseByteSizeText(text, &bytes, &reason)) {
    return absl::InvalidArgumentError(
        absl::StrCat(QuoteToml(text), " is not a byte size: ", reason));
  }
  return bytes;
}

std::string FormatByteSize(int64_t bytes) {
  static constexpr const char* kUnits[] = {"KiB", "MiB", "GiB", "TiB", "PiB"};
  if (bytes <= 0 || bytes % kKiB != 0) return FormatInt(bytes);
  int unit = -1;
  while (unit + 1 < 5 && bytes % kKiB == 0) {
    bytes /= kKiB;
    ++unit;
  }
  return absl::StrCat(bytes, kUnits[unit]);
}

}  // namespace tessera
