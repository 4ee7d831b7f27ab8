"""Text cleaning shared by the domain converters: plain text is kept as written (`x<y`, `&amp;` are text), HTML
(Law Stack Exchange bodies) becomes plain text."""

import re
from html.parser import HTMLParser

_BLOCK_TAGS = {"p", "div", "br", "li", "ul", "ol", "blockquote", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "tr",
               "table", "hr"}


class _TextExtractor(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0  # inside <script>/<style>

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self.skip += 1
        elif tag == "li":
            self.parts.append("\n- ")
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self.skip = max(0, self.skip - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def clean_text(text: str) -> str:
    """Plain text with its whitespace tidied: spaces and tabs collapsed, lines stripped, at most one blank line."""
    lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def html_to_text(html: str) -> str:
    """Plain text from HTML: tags removed (blocks and list items on lines of their own), scripts and styles left out,
    entities decoded once (`&amp;lt;` is the text `&lt;`), whitespace tidied."""
    extractor = _TextExtractor()
    extractor.feed(html)
    extractor.close()
    return clean_text("".join(extractor.parts))
