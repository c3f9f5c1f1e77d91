"""The evaluation report: ReportInput (model), its plots (plots) and its Markdown and HTML (render)."""

from .model import ReportInput
from .render import render

__all__ = ["ReportInput", "render"]
