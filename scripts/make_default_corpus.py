"""Build the corpus `wid` ships (wid/corpus/): real English text that needs no network.

WID's task-agnostic stage is masked-LM training on natural text (WID_METHOD §7). The paper used
Wikipedia + BookCorpus; offline, the best freely licensed English text at hand is gensim's test data:
~106 Wikipedia articles (CC BY-SA) and the Lee news corpus. This script turns them into plain UTF-8
text with case and punctuation kept (a WordPiece tokenizer wants natural text, not gensim's lowercased
tokens): one paragraph per line, a blank line between documents. The last ~5% of each source (by words,
whole documents) goes to a held-out file for held-out MLM loss.

gensim is needed only here, never at run time:
    pip install gensim && python scripts/make_default_corpus.py
The output is deterministic (same gensim data → same bytes).
"""
import argparse
import bz2
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from gensim.corpora.wikicorpus import filter_wiki
from gensim.test.utils import datapath

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee_background.cor"
OUT_DIR = Path(__file__).resolve().parent.parent / "wid" / "corpus"
HELDOUT_FRACTION = 0.05
MIN_WORDS = 6  # shorter lines are captions, table cells, list stubs: noise for MLM

# Sections after which an article is only lists of links and citations.
TAIL_SECTIONS = {"see also", "references", "notes", "footnotes", "further reading", "external links",
                 "bibliography", "sources", "citations", "works cited", "notes and references"}
HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$")
LIST_MARKER = re.compile(r"^[\s*#:;|!]+")
BOLD_ITALIC = re.compile(r"'{2,}")
LEFTOVER_MARKUP = re.compile(r"\[\[|\]\]|\{\{|\}\}|\{\||\|\}")
EMPTY_BRACKETS = re.compile(r"\(\s*[,;:]?\s*\)")
SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)])")
SPACE_AFTER_OPEN = re.compile(r"\(\s+")
SPACES = re.compile(r"[ \t\u00a0\u2009\u200b]+")
# Inline templates that stand for text (filter_wiki would delete them, leaving "(17751783)" or holes).
INLINE_TEMPLATES = [
    (re.compile(r"\{\{\s*(?:ndash|snd|spaced ndash)\s*\}\}", re.I), "\u2013"),
    (re.compile(r"\{\{\s*(?:mdash|mdashb|spaced mdash)\s*\}\}", re.I), "\u2014"),
    (re.compile(r"\{\{\s*nbsp\s*\}\}", re.I), " "),
    (re.compile(r"\{\{\s*lang\s*\|[^{}|]*\|([^{}|]*)[^{}]*\}\}", re.I), r"\1"),  # {{lang|grc|text}}
    (re.compile(r"\{\{\s*lang-[a-z-]+\s*\|([^{}|]*)[^{}]*\}\}", re.I), r"\1"),  # {{lang-sq|text}}
    (re.compile(r"\{\{\s*nowrap\s*\|([^{}|]*)\}\}", re.I), r"\1"),
    (re.compile(r"\{\{\s*convert\s*\|([-\d.,]+)\|([^{}|]+)[^{}]*\}\}", re.I), r"\1 \2"),
]


NOTICE = """# The shipped corpus: sources and licences

`wiki_lee.txt` (training) and `wiki_lee_heldout.txt` (held-out MLM loss) are plain text made by
`scripts/make_default_corpus.py` from the test data that ships in the gensim wheel (gensim 4.x,
`gensim/test/test_data/`). Markup was stripped and short non-prose lines dropped; the text is otherwise
unchanged. The held-out file holds the last ~5% (by words) of each source's documents.

## Wikipedia

Text of {count} English Wikipedia articles, from `enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`
(a shortened 2016 dump). Wikipedia text is © its contributors and licensed under the
[Creative Commons Attribution-ShareAlike 3.0 licence (CC BY-SA 3.0)](https://creativecommons.org/licenses/by-sa/3.0/);
the article histories (authors) are at `https://en.wikipedia.org/wiki/<title>?action=history`.
This derived text is shared under the same licence. Articles: {titles}.

## Lee corpus

`lee_background.cor`: 300 news stories from the Australian Broadcasting Corporation's news mail service, collected
for M. D. Lee, B. Pincombe and M. Welsh, "An empirical evaluation of models of text document similarity",
Proc. 27th Annual Conference of the Cognitive Science Society (2005), and redistributed with gensim
(https://github.com/piskvorky/gensim, LGPL-2.1) as test data. No separate licence is stated for the stories;
they are included here, as in gensim, for research and testing.

The rest of `wid` is Apache-2.0; these corpus files keep their sources' terms above.
"""


def clean_line(line: str) -> str:
    line = BOLD_ITALIC.sub("", line)
    line = LIST_MARKER.sub("", line)
    line = EMPTY_BRACKETS.sub("", line)
    line = SPACES.sub(" ", line)
    line = SPACE_BEFORE_PUNCT.sub(r"\1", line)
    line = SPACE_AFTER_OPEN.sub("(", line)
    return line.strip()


def wiki_paragraphs(markup: str) -> list[str]:
    """Article markup → clean prose paragraphs (headings, lists of links, tables and tails dropped)."""
    for pattern, replacement in INLINE_TEMPLATES:
        markup = pattern.sub(replacement, markup)
    paragraphs = []
    for raw in filter_wiki(markup).split("\n"):
        heading = HEADING.match(raw)
        if heading:
            if heading.group(2).strip().lower() in TAIL_SECTIONS:
                break
            continue
        if LEFTOVER_MARKUP.search(raw) or "|" in raw or "alt=" in raw:
            continue  # unparsed template, table or image-caption residue
        line = clean_line(raw)
        if len(line.split()) >= MIN_WORDS and line[-1] in '.!?"\'):;':
            paragraphs.append(line)
    return paragraphs


def wiki_documents(path: str) -> tuple[list[list[str]], list[str]]:
    """Main-namespace, non-redirect articles in dump order, each a list of paragraphs; and their titles."""
    documents, titles = [], []
    with bz2.open(path) as stream:
        for _, element in ET.iterparse(stream):
            if element.tag.rsplit("}", 1)[-1] != "page":
                continue
            namespace = element.find("{*}ns")
            text = element.find("{*}revision/{*}text")
            if namespace is not None and namespace.text == "0" and element.find("{*}redirect") is None and text is not None:
                paragraphs = wiki_paragraphs(text.text or "")
                if paragraphs:
                    documents.append(paragraphs)
                    titles.append(element.findtext("{*}title"))
            element.clear()
    return documents, titles


def lee_documents(path: str) -> list[list[str]]:
    """Lee background corpus: one news story per line, kept as a one-paragraph document."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        return [[SPACES.sub(" ", line).strip()] for line in handle if line.strip()]


def split_tail(documents: list[list[str]], fraction: float) -> tuple[list, list]:
    """Trailing whole documents holding ≥ `fraction` of the words go to held-out (at least one)."""
    words = [sum(len(p.split()) for p in doc) for doc in documents]
    target, taken, cut = fraction * sum(words), 0, len(documents)
    while cut > 1 and taken < target:
        cut -= 1
        taken += words[cut]
    return documents[:cut], documents[cut:]


def write(path: Path, documents: list[list[str]]) -> None:
    text = "\n\n".join("\n".join(doc) for doc in documents) + "\n"
    path.write_text(text, encoding="utf-8", newline="\n")


def stats(documents):
    return len(documents), sum(len(p.split()) for doc in documents for p in doc)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    wiki, titles = wiki_documents(datapath(WIKI_FILE))
    train, heldout = [], []
    for name, documents in (("wikipedia", wiki), ("lee", lee_documents(datapath(LEE_FILE)))):
        keep, hold = split_tail(documents, HELDOUT_FRACTION)
        train += keep
        heldout += hold
        print(f"{name}: {len(documents)} documents, {stats(documents)[1]} words; held out {len(hold)} ({stats(hold)[1]} words)")
    for filename, documents in (("wiki_lee.txt", train), ("wiki_lee_heldout.txt", heldout)):
        path = args.out_dir / filename
        write(path, documents)
        count, words = stats(documents)
        print(f"{path}: {count} documents, {words} words, {path.stat().st_size / 1e6:.2f} MB")
    (args.out_dir / "NOTICE.md").write_text(NOTICE.format(count=len(titles), titles=", ".join(titles)), encoding="utf-8")


if __name__ == "__main__":
    main()
