"""data: see nbs/ for the chapters of this layer"""
