#include "log.hpp"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <ctime>
#include <string>

namespace ehrgate::policyd::log {

namespace {
Level g_level = Level::Info;

const char *level_name(Level level) {
    switch (level) {
        case Level::Debug:
            return "debug";
        case Level::Info:
            return "info";
        case Level::Warn:
            return "warn";
        case Level::Error:
            return "error";
    }
    return "?";
}
}  // namespace

void set_level(Level level) {
    g_level = level;
}

bool parse_level(std::string_view text, Level *level) {
    if (text == "debug")
        *level = Level::Debug;
    else if (text == "info")
        *level = Level::Info;
    else if (text == "warn")
        *level = Level::Warn;
    else if (text == "error")
        *level = Level::Error;
    else
        return false;
    return true;
}

void write(Level level, std::string_view message) {
    if (level < g_level) {
        return;
    }
    const auto now = std::chrono::system_clock::now();
    const std::time_t seconds = std::chrono::system_clock::to_time_t(now);
    const auto millis =
        std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() %
        1000;
    std::tm utc{};
    gmtime_r(&seconds, &utc);
    char stamp[32];
    std::strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &utc);
    std::string line;
    line.reserve(message.size() + 64);
    line.append(stamp);
    char tail[48];
    std::snprintf(tail, sizeof tail, ".%03dZ policyd[%d] %s: ", static_cast<int>(millis),
                  static_cast<int>(::getpid()), level_name(level));
    line.append(tail).append(message).push_back('\n');
    // One write(2) per line so concurrent writers (nginx's stderr, tests) never interleave
    // mid-line.
    ssize_t ignored = ::write(STDERR_FILENO, line.data(), line.size());
    (void)ignored;
}

}  // namespace ehrgate::policyd::log
