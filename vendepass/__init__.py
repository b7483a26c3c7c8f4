"""
VendePass: the ticket sales server of a Brazilian low-cost airline.
"""

__version__ = "0.1.0"
