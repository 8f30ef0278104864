"""The trading pipeline's handlers: plain async functions, one event in, the events to publish out."""
