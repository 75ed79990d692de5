"""`python -m learn_and_search.bench {train,search,app}`: the benchmarks' one entry point (`bench.cli`)"""
from learn_and_search.bench.cli import main
from learn_and_search.utils import script_entry

script_entry(__name__, main)
