"""DUET-Viz: figures and the Gradio UI, built from engine traces only."""
