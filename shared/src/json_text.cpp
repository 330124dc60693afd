#include "ehrgate/json_text.hpp"

namespace ehrgate::json {

void append_string(std::string &out, std::string_view value) {
    static constexpr char kHex[] = "0123456789abcdef";
    out.push_back('"');
    for (const char ch : value) {
        const auto byte = static_cast<unsigned char>(ch);
        switch (ch) {
            case '"':
                out.append("\\\"");
                break;
            case '\\':
                out.append("\\\\");
                break;
            case '\n':
                out.append("\\n");
                break;
            case '\r':
                out.append("\\r");
                break;
            case '\t':
                out.append("\\t");
                break;
            default:
                if (byte < 0x20) {
                    out.append("\\u00");
                    out.push_back(kHex[byte >> 4]);
                    out.push_back(kHex[byte & 0xf]);
                } else {
                    out.push_back(ch);
                }
        }
    }
    out.push_back('"');
}

std::string quote(std::string_view value) {
    std::string out;
    append_string(out, value);
    return out;
}

}  // namespace ehrgate::json
