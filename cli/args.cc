#include "cli/args.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace tessera::cli {
namespace {

const FlagSpec* FindFlag(const CommandSpec& spec, const std::string& name) {
  for (const FlagSpec& f : spec.flags) {
    if (f.name == name) return &f;
  }
  for (const FlagSpec& f : GlobalFlags()) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

std::vector<std::string> FlagNames(const CommandSpec& spec) {
  std::vector<std::string> names;
  for (const FlagSpec& f : spec.flags) names.push_back("--" + f.name);
  for (const FlagSpec& f : GlobalFlags()) names.push_back("--" + f.name);
  return names;
}

size_t EditDistance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] != b[j - 1])});
      diagonal = above;
    }
  }
  return row[b.size()];
}

}  // namespace

const std::vector<FlagSpec>& GlobalFlags() {
  static const auto* flags = new std::vector<FlagSpec>{
      {"socket", "PATH",
       "the local daemon's Unix socket (default $TESSERA_SOCKET, else /run/tessera/agent.sock, "
       "the daemon's agent.socket_path)"},
      {"address", "HOST:PORT", "a daemon's peer port over TCP instead (needs the cluster token)"},
      {"token-file", "PATH", "a file holding the cluster token (cluster.token_file)"},
      {"token", "TOKEN",
       "the cluster token itself (visible to other users in ps: prefer --token-file)"},
      {"tls-cert", "PATH",
       "with --address, to a cluster with mutual TLS: a certificate its CA issued "
       "(cluster.tls_cert_file)"},
      {"tls-key", "PATH", "the key of --tls-cert"},
      {"tls-ca", "PATH", "the cluster's CA certificates (cluster.tls_ca_file)"},
      {"json", "", "print one JSON document instead of text"},
      {"timeout-s", "SECONDS", "give up on a call to the daemon after this long (default 60)"},
      {"help", "", "show this command's help"},
  };
  return *flags;
}

std::string ParsedArgs::Get(const std::string& flag, const std::string& fallback) const {
  auto it = values_.find(flag);
  return it == values_.end() ? fallback : it->second;
}

absl::StatusOr<int64_t> ParsedArgs::GetInt(const std::string& flag, int64_t fallback, int64_t min,
                                           int64_t max) const {
  auto it = values_.find(flag);
  if (it == values_.end()) return fallback;
  int64_t value;
  if (!absl::SimpleAtoi(it->second, &value) || value < min || value > max) {
    std::string range = max == INT64_MAX ? absl::StrCat("an integer >= ", min)
                                         : absl::StrCat("an integer from ", min, " to ", max);
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, " \"", it->second, "\": need ", range));
  }
  return value;
}

absl::StatusOr<double> ParsedArgs::GetDouble(const std::string& flag, double fallback, double min,
                                             bool min_inclusive) const {
  auto it = values_.find(flag);
  if (it == values_.end()) return fallback;
  double value;
  if (!absl::SimpleAtod(it->second, &value) || !std::isfinite(value) || value < min ||
      (value == min && !min_inclusive)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--", flag, " \"", it->second, "\": need a number ", min_inclusive ? ">= " : "> ", min));
  }
  return value;
}

absl::StatusOr<std::string> ParsedArgs::Require(const std::string& flag) const {
  auto it = values_.find(flag);
  if (it != values_.end()) return it->second;
  auto name = value_names_.find(flag);
  return absl::InvalidArgumentError(absl::StrCat(
      command_, " needs --", flag, name == value_names_.end() ? "" : " " + name->second));
}

absl::StatusOr<ParsedArgs> ParseCommandArgs(const CommandSpec& spec,
                                            const std::vector<std::string>& args) {
  ParsedArgs parsed;
  parsed.command_ = "tessera " + spec.name;
  for (const FlagSpec& f : spec.flags) parsed.value_names_[f.name] = f.value_name;
  auto usage = [&](const std::string& message) {
    return absl::InvalidArgumentError(absl::StrCat(message, "; usage: ", UsageLine(spec)));
  };
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg.rfind("--", 0) != 0 || arg == "--") {
      if (arg.size() > 1 && arg[0] == '-' && arg != "-") {
        return usage(absl::StrCat("unknown flag \"", arg, "\": flags start with two dashes"));
      }
      parsed.positional_.push_back(arg);
      continue;
    }
    const size_t eq = arg.find('=');
    const std::string name = arg.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
    const FlagSpec* flag = FindFlag(spec, name);
    if (flag == nullptr) {
      std::vector<std::string> names = FlagNames(spec);
      std::string guess = Closest("--" + name, names);
      return absl::InvalidArgumentError(
          absl::StrCat("unknown flag --", name, " for ", parsed.command_,
                       guess.empty() ? "" : absl::StrCat(" (did you mean ", guess, "?)"),
                       "; valid flags: ", absl::StrJoin(names, ", ")));
    }
    if (parsed.values_.count(name)) {
      return usage(absl::StrCat("--", name, " is given twice"));
    }
    std::string value;
    if (flag->value_name.empty()) {
      if (eq != std::string::npos) {
        return usage(absl::StrCat("--", name, " takes no value, got \"", arg, "\""));
      }
    } else if (eq != std::string::npos) {
      value = arg.substr(eq + 1);
    } else if (i + 1 < args.size() && args[i + 1].rfind("--", 0) != 0) {
      value = args[++i];
    } else {
      return usage(absl::StrCat("--", name, " needs a value: --", name, " ", flag->value_name));
    }
    if (!flag->value_name.empty() && value.empty()) {
      return usage(
          absl::StrCat("--", name, " needs a non-empty value: --", name, " ", flag->value_name));
    }
    parsed.values_[name] = value;
  }
  if (parsed.Has("help")) return parsed;  // the caller prints the help; nothing else matters
  if (parsed.positional_.size() < spec.positional.size()) {
    return usage(
        absl::StrCat(parsed.command_, " needs ", spec.positional[parsed.positional_.size()]));
  }
  for (const FlagSpec& f : spec.flags) {
    if (f.required && !parsed.Has(f.name)) {
      return usage(absl::StrCat(parsed.command_, " needs --", f.name, " ", f.value_name));
    }
  }
  if (parsed.positional_.size() > spec.positional.size()) {
    return usage(
        absl::StrCat("unexpected argument \"", parsed.positional_[spec.positional.size()], "\""));
  }
  return parsed;
}

std::string UsageLine(const CommandSpec& spec) {
  std::string line = "tessera " + spec.name;
  for (const std::string& p : spec.positional) absl::StrAppend(&line, " ", p);
  for (const FlagSpec& f : spec.flags) {
    const std::string flag =
        absl::StrCat("--", f.name, f.value_name.empty() ? "" : " ", f.value_name);
    absl::StrAppend(&line, " ", f.required ? flag : "[" + flag + "]");
  }
  return line;
}

std::string Closest(const std::string& word, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_distance = 3;
  for (const std::string& c : candidates) {
    const size_t d = EditDistance(word, c);
    if (d < best_distance) {
      best_distance = d;
      best = c;
    }
  }
  return best;
}

}  // namespace tessera::cli
