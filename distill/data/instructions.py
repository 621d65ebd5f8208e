"""Clean and filter the instructions a teacher writes (self_instruct, magpie) before they become prompts.

A small teacher asked to "write a question a user might ask" often wraps the question
(``A user might ask: "How do ..."``, ``Question: ...``, surrounding quotes) or, instead of a
question, talks as the assistant ("I'm an AI designed to assist and instruct users. What
question or task would you like..."). :func:`clean_instruction` unwraps the first and names a
drop reason for the second; :class:`InstructionFilter` also drops duplicates and counts every
drop by reason (the generate manifest's ``prompt_cleaning``).

Drop reasons: ``empty``, ``assistant_echo`` (self-descriptions, offers of help, the writing
instruction echoed back), ``truncated`` (cut at the token limit mid-sentence), ``too_short``,
``too_long``, ``not_a_task`` (neither a question nor a request), ``duplicate``.
"""

from __future__ import annotations

import re

MIN_WORDS = 3
MIN_CHARS = 12
MAX_CHARS = 600
DROP_REASONS = ("empty", "assistant_echo", "truncated", "too_short", "too_long", "not_a_task", "duplicate")

_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019", "\u00ab": "\u00bb", "`": "`"}
_OPEN_QUOTES = "".join(_QUOTES)
_CLOSE_QUOTES = "".join(set(_QUOTES.values()))

# Lead-ins the writer puts before the question. Applied repeatedly (they stack: 'Sure! Question: "..."').
_LEAD_INS = [
    re.compile(r"^(?:sure|certainly|of course|okay|ok|absolutely|great)\b[!.,:]*\s*", re.I),
    # "A user might ask: ...", "A user might ask the AI assistant something like: ...", "Users may ask, ..."
    re.compile(
        r"^(?:an?\s+|the\s+|one\s+)?(?:user|human|person|someone|customer|student|client|child|kid)s?\s+"
        r"(?:might|may|could|would|can|will|should|often|is likely to)?\s*(?:ask|say|type|write|request|"
        r"want to know|wonder)(?:s|ed)?\b[^:\"\u201c\n]{0,60}?(?:[:,\-\u2013\u2014]\s*|\s+(?=[\"\u201c']))",
        re.I,
    ),
    # "Here is a question a user might ask:", "Here's one:", "Here is the task:"
    re.compile(r"^here(?:'s|\s+is|\s+are)\s+[^:\n]{0,80}?:\s*", re.I),
    # "Question:", "**Task:**", "Q:", "User:", "Prompt 1:", "Instruction -"
    re.compile(
        r"^\**\s*(?:question|task|user|prompt|instruction|request|query|example|q)(?:\s*\d+)?\s*\**\s*[:\-\u2013]"
        r"\s*\**\s*",
        re.I,
    ),
]
# Where the writer starts answering its own question or adds a commentary line.
_TAIL = re.compile(r"\n\s*\**\s*(?:answer|response|assistant|solution|ai|explanation|note)\s*\**\s*:.*\Z", re.I | re.S)

_ECHO = re.compile(
    "|".join(
        [
            r"\b(?:i'?m|i am)\s+(?:an?|your|the)\s+(?:\w+\s+){0,2}(?:ai|a\.i\.|artificial intelligence|assistant|"
            r"language model|chatbot|bot)\b",
            r"\bas an?\s+(?:ai|artificial intelligence|(?:ai\s+)?language model|(?:ai\s+)?assistant)\b\s*(?:,|i\b)",
            r"\bwhat\s+(?:question|task|questions|tasks|topic)s?\s+(?:or\s+task\s+)?(?:would|do|can|could)\s+you\b",
            r"\bhow\s+(?:can|may|could)\s+i\s+(?:help|assist)\s+you\b",
            r"\b(?:i'?m|i am)\s+(?:\w+ly\s+)?(?:here|designed|programmed|trained|built|created)\s+to\s+(?:help|assist)\b",
            r"\b(?:i'?m|i am)\s+(?:so\s+|very\s+)?sorry,?\s+(?:but\s+)?i(?:'m|\s+am|\s+can'?t|\s+cannot|\s+don'?t)\b",
            r"\b(?:glad|happy)\s+you\s+asked\b",
            r"\bquestion\s+or\s+task\b",  # the writing instruction's own words
            r"\brepeat\s+the\s+(?:instruction|question)\b",
            r"\b(?:designed|programmed|trained|built|created)\s+to\s+(?:help|assist)(?:\s+and\s+\w+)?\s+(?:users|you|people)\b",
            r"\bfeel free to ask\b",
            r"\bwhat\s+(?:would|do)\s+you\s+like\s+(?:me\s+)?to\s+(?:ask|know|discuss|talk about)\b",
            r"\bself-contained question or task\b",  # the writing instruction (INSTRUCTION_TEMPLATE) echoed back
            r"\breply with the question or task only\b",
            r"\bsmollm\b",
            r"\b(?:i'?m|i am)\s+(?:ready|happy|glad|here)\s+to\s+(?:help|assist)\b",
            r"\bwhat\s+can\s+i\s+(?:help|do for)\s+you\b",
            r"\bwhat'?s\s+your\s+question\b",
            r"^\W*what\s+an?\s+(?:\w+\s+){0,2}(?:ai|assistant|task|question|request)\b",  # "What a perceptive AI assistant"
            r"^\W*an?\s+ai\s+assistant\b",
            r"\bi'?ll\s+(?:respond|reply|answer)\s+with\b",
        ]
    ),
    re.I,
)
# The writer describes the user instead of being the user ("The user wants to know which book...").
_META = re.compile(
    r"^\W*(?:the|a|this)\s+user\s+(?:wants|would like|is asking|is looking|needs|has asked|asked|"
    r"might want)\b",
    re.I,
)
# A quoted question inside other text: 'I can't think of one. A user asks me, "How do I ...?"'.
_EMBEDDED = re.compile(
    r"(?:\b(?:user|someone|person|customer|student)s?\s+(?:might\s+|may\s+|could\s+|would\s+)?"
    r"(?:asks?|says?|wonders?)(?:\s+me)?|\b(?:questions?|tasks?)\s+(?:like|such as)\s+(?:this|these)?)"
    r"\s*[:,]?\s*[\"\u201c]([^\"\u201d\n]{8,})[\"\u201d]",
    re.I,
)

_QUESTION_WORDS = {
    "what",
    "how",
    "why",
    "when",
    "where",
    "which",
    "who",
    "whom",
    "whose",
    "is",
    "are",
    "can",
    "could",
    "should",
    "would",
    "will",
    "do",
    "does",
    "did",
    "was",
    "were",
    "has",
    "have",
    "may",
    "might",
    "shall",
    "am",
    "if",
    "in",
    "for",
    "given",
    "suppose",
    "assuming",
    "using",
    "based",
    "according",
}
_TASK_VERBS = {
    "write",
    "explain",
    "describe",
    "list",
    "give",
    "create",
    "compose",
    "summarize",
    "summarise",
    "compare",
    "name",
    "suggest",
    "provide",
    "tell",
    "help",
    "calculate",
    "compute",
    "find",
    "solve",
    "translate",
    "design",
    "draft",
    "outline",
    "plan",
    "generate",
    "make",
    "recommend",
    "identify",
    "define",
    "discuss",
    "analyze",
    "analyse",
    "classify",
    "convert",
    "rewrite",
    "edit",
    "propose",
    "show",
    "implement",
    "build",
    "develop",
    "evaluate",
    "estimate",
    "choose",
    "prepare",
    "imagine",
    "pretend",
    "please",
    "share",
    "brainstorm",
    "determine",
    "sort",
    "fix",
    "debug",
    "correct",
    "simplify",
    "paraphrase",
    "proofread",
    "predict",
    "teach",
    "guide",
    "walk",
    "break",
    "rank",
    "rate",
    "convince",
    "argue",
    "persuade",
    "recite",
    "complete",
    "continue",
    "fill",
    "count",
    "add",
    "subtract",
    "multiply",
    "divide",
    "check",
    "review",
    "critique",
    "improve",
    "shorten",
    "expand",
    "elaborate",
    "illustrate",
    "demonstrate",
    "derive",
    "prove",
    "answer",
    "detail",
    "cite",
    "state",
    "mention",
    "research",
    "investigate",
    "offer",
    "express",
    "craft",
    "invent",
    "come",
    "think",
    "consider",
    "let's",
    "lets",
}
_FIRST_PERSON = {"i", "i'm", "im", "i've", "i'd", "my", "we", "we're", "our"}
_NEED = re.compile(
    r"\b(?:need|want|help|how|looking for|advice|tips?|recommend\w*|suggest\w*|ideas?|explain|"
    r"should|could you|can you|please)\b",
    re.I,
)


def _strip_quotes(text: str) -> str:
    """Drop a quote pair around the text; a lone opening quote (the writer stopped) too; trailing quotes."""
    text = text.strip()
    if text and text[0] in _QUOTES:
        close = _QUOTES[text[0]]
        end = text.find(close, 1)
        if end > 0 and (end == len(text) - 1 or text[0] not in "'`"):
            # 'A user might ask: "Why is the sky blue?" This tests...' -> the quoted question only.
            return text[1:end].strip()
        return text[1:].strip().rstrip(_CLOSE_QUOTES).strip()
    return text.rstrip(_CLOSE_QUOTES).strip() if text.count('"') % 2 == 1 and text.endswith('"') else text


def unwrap(text: str) -> str:
    """The question or task inside the writer's wrapping (lead-ins, labels, quotes, its own answer)."""
    text = (text or "").strip()
    embedded = _EMBEDDED.search(text)
    if embedded:
        text = embedded.group(1)
    for _ in range(4):  # wrappers stack; each pass removes one layer
        before = text
        text = _TAIL.sub("", text).strip()
        for pattern in _LEAD_INS:
            text = pattern.sub("", text, count=1).strip()
        text = _strip_quotes(text)
        text = text.strip("*").strip()
        if text == before:
            break
    return re.sub(r"[ \t]+", " ", text).strip()


def _is_task(text: str) -> bool:
    if "?" in text:
        return True
    first = re.sub(r"[^\w']", "", text.split(maxsplit=1)[0].lower()) if text.split() else ""
    if first in _QUESTION_WORDS or first in _TASK_VERBS:
        return True
    return first in _FIRST_PERSON and bool(_NEED.search(text))


def clean_instruction(text: str | None, finish_reason: str | None = None) -> tuple[str, str | None]:
    """``(instruction, drop reason or None)``: the unwrapped text, and why it is not a usable prompt.

    ``finish_reason == "length"`` (the writer hit its token limit) drops a text that does not end
    like a sentence as ``truncated``.
    """
    if _ECHO.search(text or ""):  # on the raw text: an echo is dropped even when wrapped
        return unwrap(text or ""), "assistant_echo"
    cleaned = unwrap(text or "")
    if not cleaned:
        return cleaned, "empty"
    if _ECHO.search(cleaned):
        return cleaned, "assistant_echo"
    if finish_reason == "length" and not re.search(r"[?.!:)\]\"'\u201d]\s*$", cleaned):
        return cleaned, "truncated"
    if len(cleaned.split()) < MIN_WORDS or len(cleaned) < MIN_CHARS:
        return cleaned, "too_short"
    if len(cleaned) > MAX_CHARS:
        return cleaned, "too_long"
    if _META.search(cleaned) or not _is_task(cleaned):
        return cleaned, "not_a_task"
    return cleaned, None


def dedup_key(text: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


class InstructionFilter:
    """Accumulates kept instructions over several rounds of asking the teacher; counts drops by reason."""

    def __init__(self) -> None:
        self.kept: list[str] = []
        self.dropped: dict[str, int] = {}
        self.seen: set[str] = set()
        self.asked = 0

    def add(self, text: str | None, finish_reason: str | None = None) -> str | None:
        """Clean one written instruction; returns it if kept, else None (and counts the reason)."""
        self.asked += 1
        cleaned, reason = clean_instruction(text, finish_reason)
        if reason is None:
            key = dedup_key(cleaned)
            if key in self.seen:
                reason = "duplicate"
            else:
                self.seen.add(key)
                self.kept.append(cleaned)
                return cleaned
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        return None
