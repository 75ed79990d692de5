"""evaluate: see nbs/ for the chapters of this layer"""
