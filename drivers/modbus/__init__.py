"""Modbus TCP: pure planning and decoding, and the pymodbus-backed driver."""
