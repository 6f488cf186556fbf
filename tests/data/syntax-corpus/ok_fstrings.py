x = 1
y = f'{x!r:>{10}} {x=} {{literal}} {"nested"}'
