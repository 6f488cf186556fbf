name = 'x'
msg = f"hello {name!s} {'a' + 'b'}"
