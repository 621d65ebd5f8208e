"""Teacher backends behind one interface (:class:`TeacherBackend`), and model sources."""

from distill.teacher.base import Completion, SamplingParams, ScoredSequence, TeacherBackend, load_backend

__all__ = ["Completion", "SamplingParams", "ScoredSequence", "TeacherBackend", "load_backend"]
