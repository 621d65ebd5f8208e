"""Cleaning the instructions a small teacher writes: unwrap wrappers, drop echoes and non-tasks, count drops."""

from __future__ import annotations

import pytest

from distill.data.instructions import InstructionFilter, clean_instruction, unwrap

ECHO = (
    "I'm an AI designed to assist and instruct users. What question or task would you like to ask or instruct me about?"
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        (
            'A user might ask: "How do I make a paper airplane that flies far?"',
            "How do I make a paper airplane that flies far?",
        ),
        # The writer hit its token limit before closing the quote.
        (
            'A user might ask: "What are the main causes of the French Revolution',
            "What are the main causes of the French Revolution",
        ),
        (
            'A user might ask the AI assistant: "Can you explain photosynthesis simply?" This question tests clarity.',
            "Can you explain photosynthesis simply?",
        ),
        ("Question: What is 12 times 7?", "What is 12 times 7?"),
        ("**Question:** Why is the sky blue?", "Why is the sky blue?"),
        ('"Write a haiku about autumn leaves."', "Write a haiku about autumn leaves."),
        ("\u201cHow many legs does a spider have?\u201d", "How many legs does a spider have?"),
        (
            'Sure! Here is a question a user might ask: "Summarise the water cycle in two sentences."',
            "Summarise the water cycle in two sentences.",
        ),
        ("Task: Translate 'good morning' into Spanish.", "Translate 'good morning' into Spanish."),
        ("What is the capital of Australia?\n\nAnswer: Canberra is the capital.", "What is the capital of Australia?"),
        ("Explain how vaccines train the immune system.", "Explain how vaccines train the immune system."),
    ],
)
def test_unwrap_keeps_the_question_inside(raw, expected):
    assert unwrap(raw) == expected
    assert clean_instruction(raw) == (expected, None)


@pytest.mark.parametrize(
    "raw",
    [
        ECHO,
        "I'm an AI designed to assist and instruct users.",
        "As an AI, I can help you with many tasks. What would you like to know?",
        "What question or task would you like me to help with?",
        'A user might ask: "I am an AI language model, how can I help you today?"',
        "Hello! How can I help you today?",
        "I'm here to help! Feel free to ask me anything.",
        "Write one clear, self-contained question or task that a user might ask an AI assistant about: birds.",
    ],
)
def test_assistant_echoes_are_dropped(raw):
    assert clean_instruction(raw)[1] == "assistant_echo"


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("", "empty"),
        ('""', "empty"),
        ("A user might ask:", "empty"),
        ("Why?", "too_short"),
        ("Explain tides.", "too_short"),
        ("Explain " + "the history of every river in Europe " * 20 + "in detail.", "too_long"),
        ("Birds are warm-blooded vertebrates with feathers and beaks.", "not_a_task"),
        ("The weather today is sunny with a light breeze.", "not_a_task"),
    ],
)
def test_non_prompts_are_dropped_with_a_reason(raw, reason):
    assert clean_instruction(raw)[1] == reason


# Written by the builtin SmolLM2-135M-Instruct for self_instruct seed prompts (temperature 0.9), verbatim.
REAL_WRITER_OUTPUTS = [
    (
        "I'm ready to assist you with any AI-related task you have in mind. What can I help you with today?",
        "stop",
        "assistant_echo",
        None,
    ),
    (
        "What a perceptive AI assistant, I'll respond with a self-contained question or task that can be understood "
        "easily by the user, and repeat the question, but with a slightly different wording.",
        "stop",
        "assistant_echo",
        None,
    ),
    ("An AI assistant, no longer needed. Explain again.", "stop", "assistant_echo", None),
    ("I'm ready to help. What's your question?", "stop", "assistant_echo", None),
    (
        "The user wants to know which book would be most enjoyable to read and which ones offer the best experiences.",
        "stop",
        "not_a_task",
        None,
    ),
    ("The user wants to summarize a paragraph. What can you provide?", "stop", "not_a_task", None),
    (
        "Once upon a time, in a small town, there was a computer named Eliza. She could not teach an ancient egyptian. "
        "And the most important thing that Eliza could do was tell people about the world.\nElla, in ancient Egypt, "
        "lived on a pla",
        "length",
        "truncated",
        None,
    ),
    (
        "I can't seem to come up with a perfect response to your question.\n\nA user asks me, \"What's the best way to "
        'explain gravity to a non-expert?"',
        "stop",
        None,
        "What's the best way to explain gravity to a non-expert?",
    ),
    (
        "Here's a possible question: \"What are the key differences between a sustainable fashion company (SFCM) and a "
        'luxury fashion company (FCE)?"',
        "stop",
        None,
        "What are the key differences between a sustainable fashion company (SFCM) and a luxury fashion company (FCE)?",
    ),
    (
        "Here's a possible question: Can you help me find the capital city of the United States?",
        "stop",
        None,
        "Can you help me find the capital city of the United States?",
    ),
    ("Example: What is the meaning of a common proverb?", "stop", None, "What is the meaning of a common proverb?"),
    ("Can you tell me how to care for a houseplant?", "stop", None, "Can you tell me how to care for a houseplant?"),
    (
        "What? I'm sorry, I'm specifically designed to assist with logic puzzles, but I'm not equipped to provide "
        "complex logic puzzles or any other forms of mental math.",
        "stop",
        "assistant_echo",
        None,
    ),
    (
        "I'm so glad you asked me that question. How about you could write a short poem about nature using the "
        "elements of nature such as light, water, earth, and fire, using a theme of balance and harmony?",
        "stop",
        "assistant_echo",
        None,
    ),
    (
        "What is a straightforward and concise way to provide a question or task for assistance?",
        "stop",
        "assistant_echo",
        None,
    ),
    (
        'The AI assistant can answer questions like this: "Can you explain the science behind climate change to a '
        'five-year-old?"',
        "stop",
        None,
        "Can you explain the science behind climate change to a five-year-old?",
    ),
]


@pytest.mark.parametrize("raw, finish, reason, kept", REAL_WRITER_OUTPUTS)
def test_real_teacher_writing_is_cleaned(raw, finish, reason, kept):
    cleaned, got = clean_instruction(raw, finish)
    assert got == reason
    if kept is not None:
        assert cleaned == kept


def test_text_cut_at_the_token_limit_is_dropped_only_mid_sentence():
    assert clean_instruction("How do rivers shape the land over thousands of", "length")[1] == "truncated"
    assert clean_instruction("How do rivers shape the land over time?", "length") == (
        "How do rivers shape the land over time?",
        None,
    )
    assert clean_instruction("How do rivers shape the land over thousands of", "stop")[1] is None


def test_kept_prompts_include_first_person_requests_and_questions_without_a_mark():
    assert clean_instruction("I need help writing a cover letter for a nursing job.")[1] is None
    assert clean_instruction("How does a bicycle stay upright when moving")[1] is None
    assert clean_instruction("I love birds and their songs.")[1] == "not_a_task"


def test_filter_counts_every_drop_by_reason_and_dedups_after_unwrapping():
    f = InstructionFilter()
    written = [
        ('A user might ask: "How do I boil an egg?"', "stop"),
        ("Question: How do I boil an egg?", "stop"),  # the same question, wrapped differently
        ("how do I boil an EGG", "stop"),  # same words, case and punctuation differ
        (ECHO, "stop"),
        ("I'm an AI designed to assist and instruct users.", "stop"),
        ("Birds are warm-blooded vertebrates with feathers and beaks.", "stop"),
        ("What are three uses of", "length"),
        ("", "stop"),
        ("Write a limerick about a cat.", "stop"),
    ]
    kept = [f.add(text, reason) for text, reason in written]
    assert f.kept == ["How do I boil an egg?", "Write a limerick about a cat."]
    assert [k for k in kept if k] == f.kept
    assert f.dropped == {"duplicate": 2, "assistant_echo": 2, "not_a_task": 1, "truncated": 1, "empty": 1}
    assert f.asked == len(written) == len(f.kept) + sum(f.dropped.values())
