#include "daemon/flags.h"

#include "absl/strings/str_cat.h"

namespace tessera {
namespace {

constexpr char kValidFlags[] =
    "valid flags: --config PATH, --set KEY=VALUE, --print-default-config, --help, --version";

absl::Status FlagError(const std::string& message) {
  return absl::InvalidArgumentError(absl::StrCat(message, "; ", kValidFlags));
}

}  // namespace

absl::StatusOr<TesseradFlags> ParseTesseradFlags(const std::vector<std::string>& args) {
  TesseradFlags flags;
  bool help = false;
  bool version = false;
  bool print_default_config = false;
  bool config_given = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg.size() < 2 || arg[0] != '-') {
      return FlagError(
          absl::StrCat("unexpected argument \"", arg, "\": tesserad takes only flags"));
    }
    size_t eq = arg.find('=');
    const std::string name = arg.substr(0, eq);
    const bool inline_value = eq != std::string::npos;

    if (name == "--help" || name == "-h" || name == "--version" ||
        name == "--print-default-config") {
      if (inline_value) return FlagError(absl::StrCat(name, " takes no value, got \"", arg, "\""));
      if (name == "--version") {
        version = true;
      } else if (name == "--print-default-config") {
        print_default_config = true;
      } else {
        help = true;
      }
      continue;
    }
    if (name != "--config" && name != "--set") {
      return FlagError(absl::StrCat("unknown flag \"", name, "\""));
    }

    const std::string usage = name == "--config" ? "--config PATH" : "--set KEY=VALUE";
    std::string value;
    if (inline_value) {
      value = arg.substr(eq + 1);
    } else if (i + 1 < args.size() && args[i + 1].rfind("--", 0) != 0) {
      value = args[++i];
    } else {
      return FlagError(absl::StrCat(name, " needs a value: ", usage));
    }
    if (value.empty()) return FlagError(absl::StrCat(name, " needs a non-empty value: ", usage));

    if (name == "--config") {
      if (config_given) {
        return FlagError(absl::StrCat("--config given twice (\"", flags.config_path, "\" and \"",
                                      value, "\"); a daemon reads one file"));
      }
      config_given = true;
      flags.config_path = value;
    } else {
      size_t key_end = value.find('=');
      if (key_end == std::string::npos || key_end == 0) {
        return FlagError(absl::StrCat(
            "--set needs KEY=VALUE, such as --set log.level=debug; got \"", value, "\""));
      }
      flags.overrides.push_back(value);
    }
  }

  if (help) {
    flags.action = TesseradFlags::Action::kHelp;
  } else if (version) {
    flags.action = TesseradFlags::Action::kVersion;
  } else if (print_default_config) {
    if (config_given || !flags.overrides.empty()) {
      return FlagError(
          "--print-default-config prints the built-in defaults and takes no --config or --set");
    }
    flags.action = TesseradFlags::Action::kPrintDefaultConfig;
  }
  return flags;
}

std::string TesseradUsage() {
  return "Usage: tesserad [--config PATH] [--set KEY=VALUE]...\n"
         "       tesserad --print-default-config | --help | --version\n"
         "\n"
         "tesserad keeps the training snapshots of this node in shared memory and protects\n"
         "them across peer nodes. It runs until SIGTERM, then drains and exits.\n"
         "\n"
         "  --config PATH           read the TOML config file PATH (default: no file,\n"
         "                          built-in defaults)\n"
         "  --set KEY=VALUE         set one config key over the file; repeatable, the last\n"
         "                          one wins (--set store.capacity_bytes=64GiB)\n"
         "  --print-default-config  print every config key with its documentation and\n"
         "                          default as a TOML file, then exit\n"
         "  -h, --help              print this help, then exit\n"
         "  --version               print the version, then exit\n"
         "\n"
         "Flags take their value as --flag VALUE or --flag=VALUE.\n";
}

}  // namespace tessera
