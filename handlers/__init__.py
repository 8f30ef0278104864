"""The trading pipeline's handlers: plain async functions, one event in, the events to publish out.

Stages, in order: ``feed`` (synthetic ticks) or a bar file -> ``bars`` -> ``indicators`` -> ``strategy`` ->
``risk`` -> ``broker`` -> ``portfolio``, with ``audit`` beside orders and fills. ``state`` holds the per-symbol
store and the sequence rule every stateful stage follows; ``pipeline`` runs them all in one process.
"""
