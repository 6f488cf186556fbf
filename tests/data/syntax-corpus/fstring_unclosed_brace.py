x = f'{y'
