// policyd's log: one line per event on stderr (systemd's journal or the run script collects it).
// Messages never carry PHI: paths, queries and patient ids are not logged, only counts, ids we
// mint and policy metadata.
#pragma once

#include <string_view>

namespace ehrgate::policyd::log {

enum class Level { Debug, Info, Warn, Error };

void set_level(Level level);
bool parse_level(std::string_view text, Level *level);
void write(Level level, std::string_view message);

inline void debug(std::string_view m) {
    write(Level::Debug, m);
}
inline void info(std::string_view m) {
    write(Level::Info, m);
}
inline void warn(std::string_view m) {
    write(Level::Warn, m);
}
inline void error(std::string_view m) {
    write(Level::Error, m);
}

}  // namespace ehrgate::policyd::log
