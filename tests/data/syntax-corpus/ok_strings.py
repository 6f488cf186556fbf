x = rb'\d' + b'a'
y = '\N{BULLET}' + u'x' + '\x41'
